//! On a 3-node Apache Kafka cluster, as in production (replication factor 3,
//! `min.insync.replicas=2`, the relay producing with `acks=all`): losing a broker under load
//! loses nothing acknowledged, keeps every document's order, and needs no replay; deleting the
//! topic is survived with the relay's replay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tandem_tests::{ManagedProcess, TwoRegions};

use crate::support::{assert_each_event_applied_once, spawn_writer, wait_published};

/// Whether the worker's program still runs: it rode through the fault without exiting.
fn running(process: &ManagedProcess) -> bool {
    process.program_pid().is_some_and(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.split_whitespace().nth(2).is_some_and(|s| s != "Z"))
    })
}

/// Region 2 received every document's events in version order: per document, the versions in
/// the order they were applied (applied_at, a clock reading per row) only go up.
async fn assert_per_document_order(regions: &TwoRegions) {
    let client = regions.region2_pool.get().await.expect("db");
    let rows = client
        .query(
            "SELECT collection, document_id, version, outcome FROM applied_events \
             ORDER BY collection, document_id, applied_at",
            &[],
        )
        .await
        .expect("applied events");
    let mut last: Option<(String, String, i64)> = None;
    for row in &rows {
        let (collection, id, version, outcome): (String, String, i64, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            outcome, "applied",
            "{collection}/{id} v{version} arrived after a newer version"
        );
        if let Some((c, i, v)) = &last {
            if *c == collection && *i == id {
                assert!(
                    version > *v,
                    "{collection}/{id}: v{version} applied after v{v}"
                );
            }
        }
        last = Some((collection, id, version));
    }
}

/// How often a worker log says it re-read a partition from the beginning (what only a lost
/// or recreated partition may cause).
fn rereads(process: &ManagedProcess) -> usize {
    std::fs::read_to_string(&process.log)
        .unwrap_or_default()
        .matches("reading it from the beginning")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_partition_leader_under_load_loses_nothing_and_keeps_order() {
    let mut regions = TwoRegions::start_on_cluster().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&regions.region1, "leader", 30, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let topic = regions.topic.clone();
    let cluster = regions.broker.cluster_mut();
    let leader = cluster.leader_of(&topic, 0).await.expect("leader");
    cluster.nodes[leader].kill();
    // The writes go on while the cluster elects new leaders and the relay and consumer move.
    tokio::time::sleep(Duration::from_secs(15)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.expect("writer");
    assert!(writes > 0);

    regions.wait_converged(Duration::from_secs(120)).await;
    assert_each_event_applied_once(&regions).await;
    assert_per_document_order(&regions).await;
    assert!(
        running(&regions.relays[0]) && running(&regions.consumers[0]),
        "the relay and the consumer ride through a broker's loss"
    );
    assert_eq!(rereads(&regions.consumers[0]), 0, "no partition re-read");

    // The node comes back with its log and catches up; writes still flow.
    let cluster = regions.broker.cluster_mut();
    cluster.nodes[leader].restart().await.expect("restart");
    regions.region1.put("leader", "after", &json!({})).await;
    regions.wait_converged(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_broker_under_load_needs_no_replay() {
    let mut regions = TwoRegions::start_on_cluster().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&regions.region1, "rolling", 30, stop.clone());
    // As a rolling upgrade or patching does it, one node at a time; each is SIGKILLed (no
    // controlled shutdown) and restarted on its own data.
    for node in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cluster = regions.broker.cluster_mut();
        cluster.nodes[node].kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.nodes[node].restart().await.expect("restart");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");

    // No `replay`: every acknowledged event reaches Region 2 from the brokers' own logs.
    regions.wait_converged(Duration::from_secs(120)).await;
    assert_each_event_applied_once(&regions).await;
    assert_per_document_order(&regions).await;
    assert!(running(&regions.relays[0]) && running(&regions.consumers[0]));
    assert_eq!(rereads(&regions.consumers[0]), 0, "no partition re-read");
}

/// The hard case of a recreated topic: the consumer keeps running (here: paused, so the new
/// partitions are refilled past its old positions before it fetches again). Kafka's consumer
/// cannot tell a recreated partition from the old one and would go on at its old offsets,
/// skipping the new partition's first records; the consumer's own check (the first record it
/// read must stay where it was) finds out and re-reads the partition. The events the deleted
/// topic held but nobody had consumed come back with the relay's replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_topic_is_deleted_and_recreated_a_replay_converges_region2() {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let regions = TwoRegions::start_on_cluster().await;
    for i in 0..40 {
        regions
            .region1
            .put("recreate", &format!("d{}", i % 10), &json!({"i": i}))
            .await;
    }
    regions.wait_converged(Duration::from_secs(60)).await;

    // Events the deleted topic will take with it, published but not yet consumed.
    regions.consumers[0].signal("STOP");
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");
    for i in 0..10 {
        regions
            .region1
            .put("recreate", &format!("lost{i}"), &json!({"lost": i}))
            .await;
    }
    wait_published(&regions).await;

    // An operator's mistake: the topic is deleted under the running relay and consumer. (The
    // relay is held while the deletion spreads through the cluster: a record produced in that
    // window can be acknowledged by a broker that has not applied the deletion yet, and go
    // with the topic; such records come back only with the replay, below.)
    regions.relays[0].signal("STOP");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .create()
        .expect("admin");
    admin
        .delete_topics(
            &[&regions.topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("delete topics")
        .into_iter()
        .for_each(|r| {
            r.expect("topic deleted");
        });
    // Writes go on; the relay recreates the topic and publishes them there, until every new
    // partition is longer than the consumer's old position in it (about 17 records each).
    for i in 0..150 {
        regions
            .region1
            .put("recreate", &format!("after{i}"), &json!({"after": i}))
            .await;
    }
    regions.relays[0].signal("CONT");
    wait_published(&regions).await;
    regions.consumers[0].signal("CONT");

    // Every write made after the topic was recreated reaches Region 2 without any replay.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let after = |rows: Vec<(String, String, i64, bool, Option<serde_json::Value>)>| {
        rows.into_iter()
            .filter(|r| r.1.starts_with("after"))
            .collect::<Vec<_>>()
    };
    loop {
        let one = after(TwoRegions::snapshot(&regions.region1.pool).await);
        let two = after(TwoRegions::snapshot(&regions.region2_pool).await);
        if one == two {
            break;
        }
        let missing: Vec<&String> = one
            .iter()
            .filter(|row| !two.contains(row))
            .map(|row| &row.1)
            .collect();
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} writes made after the topic was recreated are missing in Region 2: {missing:?}\n{}",
            missing.len(),
            one.len(),
            regions.consumers[0].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        rereads(&regions.consumers[0]) >= 1,
        "the consumer never noticed the recreated topic"
    );

    // The replay brings back what the deleted topic held.
    let output = regions.replay_since(&since);
    assert!(
        output.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    regions.wait_converged(Duration::from_secs(120)).await;
    assert_each_event_applied_once(&regions).await;
}
