//! Measurement 9, scale-out: the relay drain and Region 2's catch-up with 1, 2 and 4 workers.
//!
//! For each worker count `n`, on fresh databases and a fresh topic of [`PARTITIONS`]
//! partitions: `n` relays split the outbox into `n` shares (`RELAY_SHARES=n`; one relay runs
//! unpartitioned) and drain the same backlog as measurement 4; then one consumer with
//! `CONSUMER_LANES=n` applies what they published. The relays are started and have settled
//! their shares before the backlog is committed, so the drain times the publishing only.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::cpu::{CpuSplit, Meter};
use crate::stack::{Kind, Probes, Service, Stack, pool};

/// The worker counts measured.
pub const WORKERS: [u32; 3] = [1, 2, 4];
/// Partitions of each run's topic: enough for four lanes.
pub const PARTITIONS: u32 = 4;
const COLLECTION: &str = "scale";

#[derive(Debug)]
pub struct ScaleRun {
    pub workers: u32,
    pub rows: u64,
    pub drain: Duration,
    pub drain_cpu: CpuSplit,
    pub catch_up: Duration,
    pub catch_up_cpu: CpuSplit,
}

pub async fn run(stack: &Stack, rows: u64, probes: &Probes) -> anyhow::Result<Vec<ScaleRun>> {
    let mut runs = Vec::new();
    for workers in WORKERS {
        crate::say(&format!(
            "9. scale-out: {workers} relay(s), {workers} consumer lane(s)"
        ));
        runs.push(one(stack, rows, workers, probes).await?);
    }
    Ok(runs)
}

async fn one(stack: &Stack, rows: u64, workers: u32, probes: &Probes) -> anyhow::Result<ScaleRun> {
    let db1 = stack.pg1.create_database().await?;
    let db2 = stack.pg2.create_database().await?;
    for url in [&db1, &db2] {
        tandem_store::migrations::run(&pool(url, 1).await?).await?;
    }
    let topic = format!("{}.scale{workers}", stack.topic);
    let kafka = [
        ("KAFKA_TOPIC", topic.clone()),
        ("KAFKA_TOPIC_PARTITIONS", PARTITIONS.to_string()),
    ];

    let mut relay_env = vec![
        ("DATABASE_URL", db1.clone()),
        ("RELAY_SHARES", workers.to_string()),
    ];
    relay_env.extend(kafka.iter().cloned());
    let mut relays = Vec::new();
    for _ in 0..workers {
        relays.push(stack.spawn_with(Kind::Relay, &relay_env).await?);
    }
    wait_shares(stack, &relays).await?;
    let mut meter = Meter::default()
        .with("PostgreSQL", probes.pg1)
        .with("broker", probes.broker);
    for (i, relay) in relays.iter().enumerate() {
        meter = meter.with(&format!("relay {}", i + 1), relay.probe());
    }

    let db = pool(&db1, 2).await?;
    let client = db.get().await?;
    crate::backlog::fill_outbox(&client, COLLECTION, rows).await?;
    let committed: OffsetDateTime = client
        .query_one("SELECT clock_timestamp()", &[])
        .await?
        .get(0);
    let cpu = meter.start();
    let deadline = Instant::now() + Duration::from_secs(1800);
    // Shares publish side by side, not in one `seq` order: done when none is left (the
    // unpublished rows' partial index keeps the count cheap as the backlog shrinks).
    loop {
        let left: i64 = tandem_store::outbox::count_unpublished(&db).await?;
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{workers} relays did not drain the outbox ({left} left):\n{}",
            relays[0].process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_cpu = cpu.stop();
    let last: OffsetDateTime = client
        .query_one("SELECT max(published_at) FROM outbox", &[])
        .await?
        .get(0);
    let drain = Duration::try_from(last - committed).unwrap_or_default();
    drop(relays);

    let mut consumer_env = vec![
        ("DATABASE_URL", db2.clone()),
        ("CONSUMER_LANES", workers.to_string()),
        ("KAFKA_GROUP_ID", format!("group-{topic}")),
    ];
    consumer_env.extend(kafka.iter().cloned());
    let consumer = stack.spawn_with(Kind::Consumer, &consumer_env).await?;
    let cpu = Meter::default()
        .with("consumer", consumer.probe())
        .with("PostgreSQL", probes.pg2)
        .with("Redis", probes.redis2)
        .with("broker", probes.broker)
        .start();
    let db = pool(&db2, 1).await?;
    let client = db.get().await?;
    loop {
        let applied: i64 = client
            .query_one("SELECT count(*) FROM applied_events", &[])
            .await?
            .get(0);
        if applied as u64 >= rows {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer with {workers} lanes applied {applied} of {rows} events:\n{}",
            consumer.process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let catch_up_cpu = cpu.stop();
    let row = client
        .query_one(
            "SELECT min(applied_at), max(applied_at) FROM applied_events",
            &[],
        )
        .await?;
    let (first, last): (OffsetDateTime, OffsetDateTime) = (row.get(0), row.get(1));
    drop(consumer);
    Ok(ScaleRun {
        workers,
        rows,
        drain,
        drain_cpu,
        catch_up: Duration::try_from(last - first).unwrap_or_default(),
        catch_up_cpu,
    })
}

/// Waits until the relays hold one share each (the one relay of a single-worker run: the
/// whole outbox).
async fn wait_shares(stack: &Stack, relays: &[Service]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut held = Vec::new();
        for relay in relays {
            let text = stack
                .http
                .get(format!("{}/metrics", relay.url))
                .send()
                .await?
                .text()
                .await?;
            held.push(
                text.lines()
                    .find_map(|l| l.strip_prefix("tandem_relay_shares_held "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0),
            );
        }
        if held.iter().all(|h| *h == 1.0) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relays never settled one share each: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
