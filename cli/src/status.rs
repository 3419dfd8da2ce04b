//! `tandem status`: per region, what an operator checks first.

use serde::Serialize;
use tandem_store::{lag, leader, migrations, outbox, replica};

use crate::Outcome;
use crate::config::Connections;
use crate::output::{self, bad, good, warn};

#[derive(Serialize)]
struct Status {
    cli_version: &'static str,
    schema_latest: i32,
    healthy: bool,
    findings: Vec<String>,
    region1: Option<Region1>,
    region2: Option<Region2>,
}

#[derive(Serialize)]
struct Region1 {
    role: &'static str,
    schema_version: Option<i32>,
    leader_epochs: Vec<leader::Epoch>,
    relay_backlog: i64,
    relay_dead_letters: usize,
}

#[derive(Serialize)]
struct Region2 {
    role: &'static str,
    schema_version: Option<i32>,
    leader_epochs: Vec<leader::Epoch>,
    /// `None` before the first heartbeat was applied.
    replication_lag_ms: Option<i64>,
    consumer: lag::ConsumerReport,
    positions: Vec<replica::PartitionPosition>,
    dead_letters: usize,
}

async fn region1(connections: &Connections) -> anyhow::Result<Region1> {
    let pool = connections.region(1).await?;
    Ok(Region1 {
        role: "write region",
        schema_version: migrations::applied_version(&pool).await?,
        leader_epochs: leader::epochs(&pool).await?,
        relay_backlog: outbox::count_unpublished(&pool).await?,
        relay_dead_letters: outbox::relay_dead_letters(&pool).await?.len(),
    })
}

async fn region2(connections: &Connections) -> anyhow::Result<Region2> {
    let pool = connections.region(2).await?;
    Ok(Region2 {
        role: "replica",
        schema_version: migrations::applied_version(&pool).await?,
        leader_epochs: leader::epochs(&pool).await?,
        replication_lag_ms: lag::heartbeat_age_ms(&pool).await?,
        consumer: lag::consumer_report(&pool).await?,
        positions: replica::positions(&pool).await?,
        dead_letters: replica::list_pending_dead_letters(&pool).await?.len(),
    })
}

pub async fn run(
    connections: &Connections,
    json: bool,
    max_lag_ms: i64,
) -> anyhow::Result<Outcome> {
    let (one, two) = tokio::join!(region1(connections), region2(connections));
    let latest = migrations::latest_version();
    let mut findings = Vec::new();
    let mut unreachable = Vec::new();
    let one = match one {
        Ok(one) => {
            if one.relay_dead_letters > 0 {
                findings.push(format!(
                    "{} relay dead letters pending in Region 1",
                    one.relay_dead_letters
                ));
            }
            if one.schema_version != Some(latest) {
                findings.push(format!(
                    "Region 1's schema is at {:?}, this build's at {latest}",
                    one.schema_version
                ));
            }
            Some(one)
        }
        Err(e) => {
            unreachable.push(format!("Region 1: {e:#}"));
            None
        }
    };
    let two = match two {
        Ok(two) => {
            match two.replication_lag_ms {
                None => {
                    findings.push("Region 2 has applied no heartbeat yet (lag unknown)".to_owned())
                }
                Some(ms) if ms > max_lag_ms => {
                    findings.push(format!("replication lag {ms} ms is over {max_lag_ms} ms"))
                }
                Some(_) => {}
            }
            if two.dead_letters > 0 {
                findings.push(format!(
                    "{} dead letters pending in Region 2",
                    two.dead_letters
                ));
            }
            if two.schema_version != Some(latest) {
                findings.push(format!(
                    "Region 2's schema is at {:?}, this build's at {latest}",
                    two.schema_version
                ));
            }
            Some(two)
        }
        Err(e) => {
            unreachable.push(format!("Region 2: {e:#}"));
            None
        }
    };
    findings.extend(unreachable.iter().map(|u| format!("unreachable: {u}")));
    let status = Status {
        cli_version: env!("CARGO_PKG_VERSION"),
        schema_latest: latest,
        healthy: findings.is_empty(),
        findings,
        region1: one,
        region2: two,
    };
    if json {
        output::json(&status)?;
    } else {
        print_human(&status, max_lag_ms);
    }
    if !unreachable.is_empty() {
        anyhow::bail!("{}", unreachable.join("; "));
    }
    Ok(if status.healthy {
        Outcome::Ok
    } else {
        Outcome::Findings
    })
}

fn epochs(list: &[leader::Epoch]) -> String {
    if list.is_empty() {
        return "none elected yet".to_owned();
    }
    list.iter()
        .map(|e| format!("{} {}", e.role, e.epoch))
        .collect::<Vec<_>>()
        .join(", ")
}

fn schema(version: Option<i32>, latest: i32) -> String {
    match version {
        Some(v) if v == latest => good(&v.to_string()),
        Some(v) => warn(&format!("{v} (build: {latest})")),
        None => bad("none"),
    }
}

fn count(n: usize) -> String {
    if n == 0 {
        good("0")
    } else {
        bad(&n.to_string())
    }
}

fn print_human(status: &Status, max_lag_ms: i64) {
    let mut rows = Vec::new();
    match &status.region1 {
        Some(one) => rows.push(vec![
            "region1".to_owned(),
            one.role.to_owned(),
            epochs(&one.leader_epochs),
            "–".to_owned(),
            one.relay_backlog.to_string(),
            count(one.relay_dead_letters),
            schema(one.schema_version, status.schema_latest),
        ]),
        None => rows.push(vec!["region1".to_owned(), bad("unreachable")]),
    }
    match &status.region2 {
        Some(two) => rows.push(vec![
            "region2".to_owned(),
            two.role.to_owned(),
            epochs(&two.leader_epochs),
            match two.replication_lag_ms {
                Some(ms) if ms <= max_lag_ms => good(&format!("{ms} ms")),
                Some(ms) => bad(&format!("{ms} ms")),
                None => bad("unknown"),
            },
            format!("{} in Kafka", two.consumer.backlog),
            count(two.dead_letters),
            schema(two.schema_version, status.schema_latest),
        ]),
        None => rows.push(vec!["region2".to_owned(), bad("unreachable")]),
    }
    output::table(
        &[
            "REGION",
            "ROLE",
            "LEADER EPOCHS",
            "LAG",
            "BACKLOG",
            "DEAD LETTERS",
            "SCHEMA",
        ],
        &rows,
    );
    if let Some(two) = &status.region2 {
        if !two.positions.is_empty() {
            output::line("");
            let rows: Vec<Vec<String>> = two
                .positions
                .iter()
                .map(|p| {
                    vec![
                        p.topic.clone(),
                        p.partition.to_string(),
                        p.next_offset.to_string(),
                        p.updated_at.to_string(),
                    ]
                })
                .collect();
            output::table(&["TOPIC", "PARTITION", "NEXT OFFSET", "UPDATED"], &rows);
        }
    }
    output::line("");
    if status.findings.is_empty() {
        output::line(&good("healthy"));
    } else {
        for finding in &status.findings {
            output::line(&bad(finding));
        }
    }
    output::line(&format!("tandem {}", status.cli_version));
}
