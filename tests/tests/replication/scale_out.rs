//! The partitioned mode: relays sharing the outbox (`RELAY_SHARES`) and a consumer applying
//! partitions in parallel lanes (`CONSUMER_LANES`), under load, with a relay joining and one
//! dying.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::{Value, json};
use tandem_tests::TwoRegions;

use crate::support::{assert_each_event_applied_once, spawn_writer, wait_published};

const SHARES_HELD: &str = "tandem_relay_shares_held";

/// Waits until each relay (by index) holds the given number of shares.
async fn wait_shares(regions: &TwoRegions, expected: &[(usize, f64)], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut held = Vec::new();
        for &(relay, _) in expected {
            held.push(
                regions
                    .metric(regions.relay_ports[relay], SHARES_HELD)
                    .await,
            );
        }
        if expected
            .iter()
            .zip(&held)
            .all(|((_, want), got)| *got == Some(*want))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the relays hold {held:?} shares, not {expected:?}:\n{}",
            regions
                .relays
                .iter()
                .map(|r| r.log_tail())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every change event in the topic, read back from the broker: per document, the first copy of
/// each event must come in outbox order (a relay that takes a share over may publish again
/// what the dead one published without marking it: those later copies are duplicates the
/// consumer recognises). Returns how many events were read.
async fn assert_per_document_order(regions: &TwoRegions, expected: usize) -> usize {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .set("group.id", format!("order-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    reader.subscribe(&[&regions.topic]).expect("subscribe");
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let reader = Arc::new(reader);
    while seen.len() < expected {
        assert!(
            Instant::now() < deadline,
            "read only {} of {expected} events back",
            seen.len()
        );
        let polled = {
            let reader = reader.clone();
            tokio::task::spawn_blocking(move || {
                reader.poll(Duration::from_millis(200)).map(|m| {
                    m.map(|m| (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)))
                })
            })
            .await
            .expect("poll")
        };
        let Some(Ok((Some(key), Some(payload)))) = polled else {
            continue;
        };
        let Ok(body) = serde_json::from_slice::<Value>(&payload) else {
            continue;
        };
        // Heartbeats carry no sequence.
        let (Some(id), Some(sequence)) = (body["id"].as_str(), body["sequence"].as_i64()) else {
            continue;
        };
        if !seen.insert(id.to_owned()) {
            continue;
        }
        let key = String::from_utf8_lossy(&key).into_owned();
        if let Some(before) = last.insert(key.clone(), sequence) {
            assert!(
                before < sequence,
                "{key}: event of outbox row {sequence} first published after row {before}"
            );
        }
    }
    seen.len()
}

async fn outbox_rows(regions: &TwoRegions) -> usize {
    usize::try_from(regions.region1.count("outbox").await).expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_relays_split_the_outbox_hand_shares_over_and_take_a_dead_ones() {
    let mut regions = TwoRegions::start_without_workers().await;
    let shares = [("RELAY_SHARES", "4")];
    regions.start_relay_with(&shares);
    regions.start_consumer_with(&[("CONSUMER_LANES", "3"), ("CONSUMER_BATCH_SIZE", "20")]);
    regions.wait_region2_ready(Duration::from_secs(60)).await;
    // Alone, the first relay publishes every share.
    wait_shares(&regions, &[(0, 4.0)], Duration::from_secs(20)).await;
    // What the share alerts compare the held shares with (eks/base/observability).
    assert_eq!(
        regions
            .metric(regions.relay_ports[0], "tandem_relay_shares")
            .await,
        Some(4.0)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&regions.region1, "shares", 40, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A second relay joins under load: the first hands two shares over.
    regions.start_relay_with(&shares);
    wait_shares(&regions, &[(0, 2.0), (1, 2.0)], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = writer.await.expect("writer");
    wait_published(&regions).await;
    // Both published, and no row twice: the shares are disjoint, and a share handed over
    // was settled first.
    let mut published = Vec::new();
    for relay in 0..2 {
        let events = regions
            .metric(
                regions.relay_ports[relay],
                "tandem_relay_events_published_total",
            )
            .await
            .unwrap_or_default();
        assert!(events > 0.0, "relay {relay} published nothing");
        published.push(events);
    }
    let rows = outbox_rows(&regions).await;
    assert_eq!(published.iter().sum::<f64>(), rows as f64, "{published:?}");

    // The first dies under load: the second takes its shares over.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&regions.region1, "shares", 40, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    regions.relays[0].signal("KILL");
    wait_shares(&regions, &[(1, 4.0)], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writes += writer.await.expect("writer");
    assert!(writes > 50, "the writer made too little progress: {writes}");

    regions.wait_converged(Duration::from_secs(60)).await;
    assert_each_event_applied_once(&regions).await;
    let events = outbox_rows(&regions).await;
    assert_eq!(assert_per_document_order(&regions, events).await, events);
    // The lanes left the progress to the consumer's heartbeat, which recorded it.
    let applied: Option<time::OffsetDateTime> = regions
        .region2_pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT last_applied_at FROM replication_status WHERE id = 1",
            &[],
        )
        .await
        .expect("status")
        .get(0);
    assert!(
        applied.is_some(),
        "the consumer's progress was never recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpartitioned_relay_and_partitioned_ones_never_publish_together() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    regions.start_consumer();
    regions.wait_region2_ready(Duration::from_secs(60)).await;
    wait_shares(&regions, &[(0, 1.0)], Duration::from_secs(20)).await;
    // A relay of another mode (a rolling change of RELAY_SHARES) waits for the old one.
    regions.start_relay_with(&[("RELAY_SHARES", "2")]);
    // And one of another share count waits for both.
    regions.start_relay_with(&[("RELAY_SHARES", "3")]);
    for n in 0..10 {
        regions
            .region1
            .put("modes", &format!("d{n}"), &json!({"n": n}))
            .await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_shares(
        &regions,
        &[(0, 1.0), (1, 0.0), (2, 0.0)],
        Duration::from_secs(5),
    )
    .await;

    regions.relays[0].signal("KILL");
    // Either partitioned relay may win the race to join; the other keeps waiting.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let two = regions.metric(regions.relay_ports[1], SHARES_HELD).await;
        let three = regions.metric(regions.relay_ports[2], SHARES_HELD).await;
        match (two, three) {
            (Some(2.0), Some(0.0)) | (Some(0.0), Some(3.0)) => break (two, three),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no partitioned relay took the outbox alone: {two:?} {three:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for n in 10..20 {
        regions
            .region1
            .put("modes", &format!("d{n}"), &json!({"n": n}))
            .await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;
    // Still one mode at a time.
    let two = regions.metric(regions.relay_ports[1], SHARES_HELD).await;
    let three = regions.metric(regions.relay_ports[2], SHARES_HELD).await;
    assert_eq!((two, three), held);
    assert_each_event_applied_once(&regions).await;
}
