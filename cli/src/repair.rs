//! `tandem repair`: fixes only the documents `tandem verify` finds different, by re-emitting
//! Region 1's current state of each through the outbox as a repair event
//! ([`tandem_core::event::Repair`]), which Region 2's apply takes under its usual guards plus
//! the repair's rule; or, for a document only Region 2 has, a purge of that row. Region 2 is
//! never written directly: a repair is done once the relay published it and the consumer
//! applied it (a `tandem verify` afterwards is clean).

use std::time::Duration;

use serde::Serialize;
use tandem_core::document::{Collection, DocumentId, DocumentKey};
use tandem_store::documents::{self, RepairAction};

use crate::Outcome;
use crate::output::{self, bad, good};
use crate::verify::{self, Difference};

#[derive(Debug, Serialize)]
pub struct Repaired {
    #[serde(flatten)]
    pub difference: Difference,
    /// What was enqueued (or, on a dry run, would be); `None` when it failed.
    pub repair: Option<RepairAction>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub collection: Option<String>,
    /// `documents` columns that differ: a schema difference is not repaired.
    pub schema_differences: Vec<String>,
    pub documents: Vec<Repaired>,
    /// Repair events enqueued (or planned on a dry run).
    pub repaired: usize,
    pub failed: usize,
}

pub async fn run(
    one: &deadpool_postgres::Pool,
    two: &deadpool_postgres::Pool,
    collection: Option<String>,
    catch_up_timeout: Duration,
    dry_run: bool,
) -> anyhow::Result<Report> {
    let found = verify::Verifier::new(one, two, collection.clone(), catch_up_timeout)
        .run()
        .await?;
    let mut documents = Vec::new();
    for difference in found.differences {
        let result = async {
            let key = DocumentKey::new(
                Collection::parse(&difference.collection)?,
                DocumentId::parse(&difference.id)?,
            );
            Ok::<_, anyhow::Error>(
                documents::repair(one, &key, difference.region2_version, dry_run).await?,
            )
        }
        .await;
        documents.push(match result {
            Ok(action) => Repaired {
                difference,
                repair: Some(action),
                error: None,
            },
            Err(e) => Repaired {
                difference,
                repair: None,
                error: Some(format!("{e:#}")),
            },
        });
    }
    let failed = documents.iter().filter(|d| d.error.is_some()).count();
    if !dry_run && !documents.is_empty() {
        // Wake the relay now rather than at its next poll; a failure only costs that poll.
        tandem_store::outbox::notify(one).await.ok();
    }
    let repaired = documents
        .iter()
        .filter(|d| matches!(&d.repair, Some(a) if *a != RepairAction::Nothing))
        .count();
    Ok(Report {
        dry_run,
        collection,
        schema_differences: found.schema_differences,
        documents,
        repaired,
        failed,
    })
}

/// 0 when every difference was repaired (or there was none); 1 when something could not be.
pub fn outcome(report: &Report) -> Outcome {
    if report.failed == 0 && report.schema_differences.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Findings
    }
}

pub fn print(report: &Report) {
    for s in &report.schema_differences {
        output::line(&bad(&format!(
            "documents column differs (not repaired, migrate the region): {s}"
        )));
    }
    if report.documents.is_empty() {
        output::line(&good("nothing to repair: Region 2 equals Region 1"));
        return;
    }
    let verb = if report.dry_run { "would " } else { "" };
    let rows: Vec<Vec<String>> = report
        .documents
        .iter()
        .map(|d| {
            let action = match (&d.repair, &d.error) {
                (_, Some(e)) => bad(&format!("failed: {e}")),
                (
                    Some(RepairAction::Reemitted {
                        version,
                        deleted,
                        replaces,
                        ..
                    }),
                    _,
                ) => format!(
                    "{verb}re-emit version {version}{} over {}",
                    if *deleted { " (tombstone)" } else { "" },
                    replaces.map_or("none".to_owned(), |v| format!("version {v}"))
                ),
                (Some(RepairAction::Purge { replaces, .. }), _) => {
                    format!("{verb}purge version {replaces}")
                }
                (Some(RepairAction::Nothing), _) | (None, None) => "nothing to do".to_owned(),
            };
            vec![
                d.difference.collection.clone(),
                d.difference.id.clone(),
                d.difference.kind.label().to_owned(),
                action,
            ]
        })
        .collect();
    output::table(&["COLLECTION", "ID", "DIFFERENCE", "REPAIR"], &rows);
    let summary = format!(
        "{} repair events {}, {} failed{}",
        report.repaired,
        if report.dry_run {
            "planned (dry run, nothing enqueued)"
        } else {
            "enqueued in Region 1's outbox"
        },
        report.failed,
        if report.dry_run {
            ""
        } else {
            "; Region 2 applies them once the relay publishes them (`tandem verify` to confirm)"
        }
    );
    output::line(&if report.failed == 0 {
        good(&summary)
    } else {
        bad(&summary)
    });
}
