//! `tandem status`: per region, what an operator checks first.

use std::collections::BTreeSet;

use serde::Serialize;
use tandem_runtime::kafka::KafkaSettings;
use tandem_store::housekeeping::{self, LastRun};
use tandem_store::{lag, leader, migrations, outbox, replica, roles};

use crate::Outcome;
use crate::broker::{self, Watermarks};
use crate::config::Connections;
use crate::output::{self, bad, good, warn};

#[derive(Serialize)]
struct Status {
    cli_version: &'static str,
    schema_latest: i32,
    healthy: bool,
    findings: Vec<String>,
    /// `None` when no broker is configured (`--kafka-brokers`, `KAFKA_BROKERS`, the stack file).
    broker: Option<Broker>,
    region1: Option<Region1>,
    region2: Option<Region2>,
}

/// Whether the broker answered the watermark queries.
#[derive(Serialize)]
struct Broker {
    brokers: String,
    reachable: bool,
    error: Option<String>,
}

/// One partition: where Region 2's apply stands and where the topic ends.
#[derive(Serialize)]
struct PartitionLag {
    topic: String,
    partition: i32,
    /// The next offset Region 2 will apply (`consumer_offsets`); `None` before its first.
    applied_offset: Option<i64>,
    /// The broker's high watermark (the offset of the next record written); `None` when the
    /// broker was not asked or did not answer.
    high_watermark: Option<i64>,
    /// Records in the topic not applied yet: high watermark minus the applied offset (minus
    /// the low watermark before any was applied).
    behind: Option<i64>,
    #[serde(with = "time::serde::rfc3339::option")]
    updated_at: Option<time::OffsetDateTime>,
}

#[derive(Serialize)]
struct Region1 {
    role: String,
    /// The database's `region_role` row (`None` before a Write API first started on it).
    write_role: Option<roles::Role>,
    schema_version: Option<i32>,
    leader_epochs: Vec<leader::Epoch>,
    relay_backlog: i64,
    relay_dead_letters: usize,
    /// Lost writes of a deposed write region kept here (`tandem lost-writes`).
    quarantined: usize,
    /// The last housekeeping pass per target (published outbox rows, idempotency keys).
    last_prune: Vec<LastRun>,
}

#[derive(Serialize)]
struct Region2 {
    role: String,
    /// The database's `region_role` row (`None` while no Write API ever started on it).
    write_role: Option<roles::Role>,
    schema_version: Option<i32>,
    leader_epochs: Vec<leader::Epoch>,
    /// `None` before the first heartbeat was applied.
    replication_lag_ms: Option<i64>,
    consumer: lag::ConsumerReport,
    positions: Vec<replica::PartitionPosition>,
    /// Each partition's applied offset next to the broker's high watermark.
    partitions: Vec<PartitionLag>,
    dead_letters: usize,
    /// Lost writes of a deposed write region kept here (`tandem lost-writes`).
    quarantined: usize,
    /// The last housekeeping pass per target (applied event ids).
    last_prune: Vec<LastRun>,
}

async fn region1(connections: &Connections) -> anyhow::Result<Region1> {
    let pool = connections.region(1).await?;
    let write_role = roles::current(&pool).await?;
    Ok(Region1 {
        role: role_label(write_role.as_ref(), "write region"),
        write_role,
        schema_version: migrations::applied_version(&pool).await?,
        leader_epochs: leader::epochs(&pool).await?,
        relay_backlog: outbox::count_unpublished(&pool).await?,
        relay_dead_letters: outbox::relay_dead_letters(&pool).await?.len(),
        quarantined: replica::lost_writes(&pool).await?.len(),
        last_prune: housekeeping::last_runs(&pool).await?,
    })
}

async fn region2(connections: &Connections) -> anyhow::Result<Region2> {
    let pool = connections.region(2).await?;
    let write_role = roles::current(&pool).await?;
    Ok(Region2 {
        role: role_label(write_role.as_ref(), "replica"),
        write_role,
        schema_version: migrations::applied_version(&pool).await?,
        leader_epochs: leader::epochs(&pool).await?,
        replication_lag_ms: lag::heartbeat_age_ms(&pool).await?,
        consumer: lag::consumer_report(&pool).await?,
        positions: replica::positions(&pool).await?,
        partitions: Vec::new(),
        dead_letters: replica::list_pending_dead_letters(&pool).await?.len(),
        quarantined: replica::lost_writes(&pool).await?.len(),
        last_prune: housekeeping::last_runs(&pool).await?,
    })
}

/// Asks the broker for the watermarks of every topic Region 2 holds positions of (and of
/// `--kafka-topic`): `None` when no broker is configured.
async fn broker_watermarks(
    connections: &Connections,
    two: Option<&Region2>,
) -> Option<(Broker, Watermarks)> {
    let brokers = connections.kafka_brokers.clone()?;
    let mut topics: BTreeSet<String> = two
        .map(|t| t.positions.iter().map(|p| p.topic.clone()).collect())
        .unwrap_or_default();
    topics.extend(connections.kafka_topic.clone());
    let topic = topics.iter().next().cloned().unwrap_or_default();
    let asked = match KafkaSettings::for_brokers(brokers.clone(), topic) {
        Ok(settings) => {
            broker::watermarks(&settings, topics.into_iter().collect(), broker::TIMEOUT).await
        }
        Err(e) => Err(e.into()),
    };
    Some(match asked {
        Ok(marks) => (
            Broker {
                brokers,
                reachable: true,
                error: None,
            },
            marks,
        ),
        Err(e) => (
            Broker {
                brokers,
                reachable: false,
                error: Some(format!("{e:#}")),
            },
            Watermarks::new(),
        ),
    })
}

/// Region 2's positions joined with the broker's watermarks, by topic and partition: every
/// partition either side knows.
fn partition_lags(
    positions: &[replica::PartitionPosition],
    marks: &Watermarks,
) -> Vec<PartitionLag> {
    let mut keys: BTreeSet<(String, i32)> = marks.keys().cloned().collect();
    keys.extend(positions.iter().map(|p| (p.topic.clone(), p.partition)));
    keys.into_iter()
        .map(|(topic, partition)| {
            let position = positions
                .iter()
                .find(|p| p.topic == topic && p.partition == partition);
            let watermarks = marks.get(&(topic.clone(), partition)).copied();
            let applied_offset = position.map(|p| p.next_offset);
            PartitionLag {
                behind: watermarks.map(|(low, high)| (high - applied_offset.unwrap_or(low)).max(0)),
                high_watermark: watermarks.map(|(_, high)| high),
                applied_offset,
                updated_at: position.map(|p| p.updated_at),
                topic,
                partition,
            }
        })
        .collect()
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
            if one.quarantined > 0 {
                findings.push(format!(
                    "{} lost writes quarantined in Region 1 (tandem lost-writes)",
                    one.quarantined
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
            if two.quarantined > 0 {
                findings.push(format!(
                    "{} lost writes quarantined in Region 2 (tandem lost-writes)",
                    two.quarantined
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
    let (broker, marks) = match broker_watermarks(connections, two.as_ref()).await {
        Some((broker, marks)) => (Some(broker), marks),
        None => (None, Watermarks::new()),
    };
    if let Some(Broker {
        brokers,
        error: Some(error),
        ..
    }) = &broker
    {
        unreachable.push(format!("the Kafka broker ({brokers}): {error}"));
    }
    let mut two = two;
    if let Some(two) = two.as_mut() {
        two.partitions = partition_lags(&two.positions, &marks);
    }
    findings.extend(unreachable.iter().map(|u| format!("unreachable: {u}")));
    let status = Status {
        cli_version: env!("CARGO_PKG_VERSION"),
        schema_latest: latest,
        healthy: findings.is_empty(),
        findings,
        broker,
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

/// How long ago `at` was, by this machine's clock, in the largest whole unit.
fn ago(at: time::OffsetDateTime) -> String {
    let seconds = (time::OffsetDateTime::now_utc() - at)
        .whole_seconds()
        .max(0);
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// The region's role as its database records it: the write region (fenced or not) or a
/// replica of another, with the write epoch; `otherwise` when no role is recorded.
fn role_label(role: Option<&roles::Role>, otherwise: &str) -> String {
    match role {
        None => otherwise.to_owned(),
        Some(r) if r.accepts_writes() => format!("write region (write epoch {})", r.write_epoch),
        Some(r) if r.write_region == r.region => {
            format!("write region, fenced (write epoch {})", r.write_epoch)
        }
        Some(r) => format!(
            "replica of {} (write epoch {})",
            r.write_region, r.write_epoch
        ),
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
            one.role.clone(),
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
            two.role.clone(),
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
        if !two.partitions.is_empty() {
            output::line("");
            let unknown = || "?".to_owned();
            let rows: Vec<Vec<String>> = two
                .partitions
                .iter()
                .map(|p| {
                    vec![
                        p.topic.clone(),
                        p.partition.to_string(),
                        p.applied_offset
                            .map_or_else(|| "none".to_owned(), |o| o.to_string()),
                        p.high_watermark.map_or_else(unknown, |h| h.to_string()),
                        match p.behind {
                            Some(0) => good("0"),
                            Some(n) => warn(&n.to_string()),
                            None => unknown(),
                        },
                        p.updated_at
                            .map_or_else(|| "–".to_owned(), |t| t.to_string()),
                    ]
                })
                .collect();
            output::table(
                &[
                    "TOPIC",
                    "PARTITION",
                    "APPLIED",
                    "HIGH WATERMARK",
                    "BEHIND",
                    "UPDATED",
                ],
                &rows,
            );
        }
    }
    match &status.broker {
        None => output::line(
            "broker: not configured (--kafka-brokers or KAFKA_BROKERS): high watermarks not shown",
        ),
        Some(Broker {
            brokers,
            reachable: true,
            ..
        }) => output::line(&format!("broker {brokers}: {}", good("reachable"))),
        Some(Broker { brokers, error, .. }) => output::line(&format!(
            "broker {brokers}: {} ({})",
            bad("unreachable"),
            error.as_deref().unwrap_or_default()
        )),
    }
    let prunes: Vec<Vec<String>> = [
        ("region1", status.region1.as_ref().map(|r| &r.last_prune)),
        ("region2", status.region2.as_ref().map(|r| &r.last_prune)),
    ]
    .into_iter()
    .filter_map(|(region, runs)| Some((region, runs?)))
    .flat_map(|(region, runs)| {
        if runs.is_empty() {
            return vec![vec![region.to_owned(), "–".to_owned(), warn("never")]];
        }
        runs.iter()
            .map(|run| {
                vec![
                    region.to_owned(),
                    run.target.clone(),
                    format!("{} ({} ago)", run.ran_at, ago(run.ran_at)),
                    run.rows_removed.to_string(),
                    run.total_removed.to_string(),
                ]
            })
            .collect()
    })
    .collect();
    if !prunes.is_empty() {
        output::line("");
        output::table(
            &["REGION", "PRUNED", "LAST PASS", "REMOVED", "REMOVED IN ALL"],
            &prunes,
        );
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
