use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tandem_tests::TwoRegions;

use crate::support::{assert_each_event_applied_once, spawn_writer, unpublished, wait_published};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_and_the_consumer_under_load_loses_and_duplicates_nothing() {
    let mut regions = TwoRegions::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&regions.region1, "crash", 50, stop.clone());
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let relay = regions.relays.len() - 1;
        regions.relays[relay].signal("KILL");
        tokio::time::sleep(Duration::from_millis(300)).await;
        regions.start_relay();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let consumer = regions.consumers.len() - 1;
        regions.consumers[consumer].signal("KILL");
        tokio::time::sleep(Duration::from_millis(300)).await;
        regions.start_consumer();
        eprintln!("crash round {round} done");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.expect("writer");
    assert!(writes > 50, "the writer made too little progress: {writes}");
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_each_event_applied_once(&regions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_broker_outage_does_not_stop_writes_and_region2_catches_up() {
    let regions = TwoRegions::start().await;
    regions.region1.put("outage", "first", &json!({})).await;
    regions.wait_converged(Duration::from_secs(30)).await;

    let stop = Arc::new(AtomicBool::new(false));
    regions.broker.pause(true);
    let writer = spawn_writer(&regions.region1, "outage", 40, stop.clone());
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer
        .await
        .expect("writes kept succeeding while the broker was down");
    assert!(writes > 20, "only {writes} writes in 10 s");
    let waiting = unpublished(&regions).await;
    assert!(waiting > 0, "the outbox buffers while the broker is down");
    regions.broker.pause(false);
    regions.wait_converged(Duration::from_secs(90)).await;
    assert_each_event_applied_once(&regions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_loses_its_data_a_replay_makes_region2_converge() {
    let mut regions = TwoRegions::start().await;
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");
    for i in 0..60 {
        regions
            .region1
            .put("loss", &format!("d{}", i % 15), &json!({"i": i}))
            .await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;

    // Region 2's consumer is down while more events are published: they sit only in the broker.
    regions.consumers[0].signal("KILL");
    for i in 0..20 {
        regions
            .region1
            .put("loss", &format!("lost{i}"), &json!({"in_flight": i}))
            .await;
    }
    wait_published(&regions).await;
    // The memory broker forgets every topic, message and offset: those events are gone.
    regions
        .broker
        .restart_empty()
        .await
        .expect("restart broker");
    regions.start_consumer();
    // Writes keep coming after the loss, on the recreated topic.
    for i in 0..10 {
        regions
            .region1
            .put("loss", &format!("after{i}"), &json!({"after": i}))
            .await;
    }
    let client = regions.region2_pool.get().await.expect("db");

    let output = regions.replay_since(&since);
    assert!(
        output.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    regions.wait_converged(Duration::from_secs(90)).await;
    // Replayed events already applied were recognised as duplicates, not applied twice.
    let duplicates_ignored: i64 = client
        .query_one("SELECT count(*) FROM applied_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(duplicates_ignored, regions.region1.count("outbox").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_active_relay_dies_the_standby_continues() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    regions.start_relay();
    regions.start_consumer();
    regions.region1.put("failover", "a", &json!({"n": 1})).await;
    regions.wait_converged(Duration::from_secs(30)).await;

    regions.relays[0].signal("KILL");
    for n in 0..20 {
        regions
            .region1
            .put("failover", &format!("b{n}"), &json!({"n": n}))
            .await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;
    assert_each_event_applied_once(&regions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_later_events_still_apply() {
    let regions = TwoRegions::start().await;
    regions.region1.put("poison", "before", &json!({})).await;
    regions.wait_converged(Duration::from_secs(30)).await;

    produce_raw(&regions, [
        ("poison/garbage", b"this is not json".to_vec()),
        ("poison/invalid", json!({"specversion": "1.0", "id": uuid::Uuid::now_v7(), "source": "/x", "type": "dev.tandem.document.upserted", "time": "2026-01-01T00:00:00Z", "subject": "poison/invalid", "datacontenttype": "application/json", "data": {"collection": "poison", "id": "invalid", "version": 0, "updated_at": "2026-01-01T00:00:00Z"}}).to_string().into_bytes()),
    ])
    .await;
    regions
        .region1
        .put("poison", "after", &json!({"still": "applies"}))
        .await;
    regions.wait_converged(Duration::from_secs(30)).await;

    let client = regions.region2_pool.get().await.expect("db");
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters[0].1.starts_with("undecodable event"), "{letters:?}");
    assert!(
        letters[1].1.contains("version must be positive"),
        "{letters:?}"
    );
    let after = regions.region2_get("/v1/poison/after").await;
    assert_eq!(after.status(), 200);

    // Redrive: a dead letter that is valid now (say, dead-lettered by a bug since fixed) is
    // applied; the garbage stays, with its reason.
    let event = tandem_core::event::ChangeEvent::new(
        uuid::Uuid::now_v7(),
        &tandem_core::event::Origin::new("region1", 1, 1),
        time::OffsetDateTime::now_utc(),
        serde_json::from_value(json!({"collection": "poison", "id": "redriven", "version": 1, "data": {"ok": true}, "updated_at": "2026-11-25T09:00:00Z"}))
            .expect("state"),
    );
    client
        .execute(
            "INSERT INTO dead_letters (topic, partition, \"offset\", payload, reason) VALUES ($1, 0, 999999, $2, 'test')",
            &[&regions.topic, &event.encode()],
        )
        .await
        .expect("insert dead letter");
    let output = regions.redrive();
    assert!(
        output.status.success(),
        "redrive failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let redriven = regions.region2_get("/v1/poison/redriven").await;
    assert_eq!(redriven.status(), 200);
    let pending: Vec<String> = client
        .query(
            "SELECT redrive_result FROM dead_letters WHERE redriven_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .expect("pending")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert!(
        pending.iter().all(|r| r.starts_with("still poison")),
        "{pending:?}"
    );
}

/// Sends records straight to the topic, as a foreign or broken producer would.
async fn produce_raw<const N: usize>(regions: &TwoRegions, records: [(&str, Vec<u8>); N]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .create()
        .expect("producer");
    for (key, payload) in records {
        producer
            .send(
                FutureRecord::to(&regions.topic).key(key).payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .expect("produce");
    }
}

/// `(message key, reason)` of every dead letter, by key.
async fn dead_letters(client: &tokio_postgres::Client) -> Vec<(String, String)> {
    client
        .query(
            "SELECT message_key, reason FROM dead_letters ORDER BY message_key",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| {
            let key: Option<Vec<u8>> = r.get(0);
            (
                String::from_utf8_lossy(&key.unwrap_or_default()).into_owned(),
                r.get(1),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_with_bad_events_in_it_applies_in_batches_and_sets_aside_only_the_bad_ones() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    // Ten versions of each of twenty documents: a batch holds several versions of a document.
    for round in 1..=10 {
        for d in 0..20 {
            let response = regions
                .region1
                .put("batch", &format!("d{d}"), &json!({"round": round}))
                .await;
            assert!(response.status().is_success());
        }
    }
    wait_published(&regions).await;
    // In the middle of the backlog: garbage, and an event that decodes but that PostgreSQL
    // refuses (jsonb cannot hold a NUL character), which fails the batch it is in.
    let refused = tandem_core::event::ChangeEvent::new(
        uuid::Uuid::now_v7(),
        &tandem_core::event::Origin::new("region1", 1, 1),
        time::OffsetDateTime::now_utc(),
        serde_json::from_value(json!({"collection": "batch", "id": "nul", "version": 1, "data": {"text": "a\u{0}b"}, "updated_at": "2026-11-25T09:00:00Z"}))
            .expect("state"),
    );
    produce_raw(
        &regions,
        [
            ("batch/garbage", b"{not json".to_vec()),
            ("batch/nul", refused.encode()),
        ],
    )
    .await;
    for d in 0..20 {
        let response = regions
            .region1
            .write(reqwest::Method::DELETE, &format!("/v1/batch/d{d}"))
            .send()
            .await
            .expect("DELETE");
        assert_eq!(response.status(), 204);
    }
    wait_published(&regions).await;

    regions.start_consumer();
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_each_event_applied_once(&regions).await;

    let client = regions.region2_pool.get().await.expect("db");
    let outcomes: Vec<(String, i64, i64)> = client
        .query(
            "SELECT outcome, count(*), count(DISTINCT xmin::text) FROM applied_events GROUP BY outcome",
            &[],
        )
        .await
        .expect("outcomes")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // Every event arrived in order, so none was stale; 220 events took far fewer transactions.
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let (outcome, events, transactions) = &outcomes[0];
    assert_eq!((outcome.as_str(), *events), ("applied", 220));
    assert!(*transactions < 110, "not batched: {outcomes:?}");

    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].0, "batch/garbage");
    assert!(letters[0].1.starts_with("undecodable event"), "{letters:?}");
    assert_eq!(letters[1].0, "batch/nul");
    assert!(
        letters[1].1.starts_with("could not be applied"),
        "{letters:?}"
    );
    assert_eq!(regions.region2_get("/v1/batch/nul").await.status(), 404);
    assert_eq!(regions.region2_get("/v1/batch/d7").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_what_region2_holds_change_nothing_even_within_one_batch() {
    let mut regions = TwoRegions::start().await;
    regions.region1.put("order", "doc", &json!({"v": 1})).await;
    regions.wait_converged(Duration::from_secs(30)).await;
    // With the consumer down, so that they are applied as one batch: a tombstone at version 5,
    // then upserts at versions 4 and 3 of the same document (arriving out of order).
    regions.consumers[0].kill_and_wait();
    let event = |version: i64, deleted: bool| {
        let data = (!deleted).then(|| json!({"v": version}));
        tandem_core::event::ChangeEvent::new(
            uuid::Uuid::now_v7(),
            &tandem_core::event::Origin::new("region1", 1, 1),
            time::OffsetDateTime::now_utc(),
            serde_json::from_value(json!({"collection": "order", "id": "doc", "version": version, "deleted": deleted, "data": data, "updated_at": "2026-11-25T10:00:00Z"}))
                .expect("state"),
        )
    };
    let events = [event(5, true), event(4, false), event(3, false)];
    produce_raw(
        &regions,
        [
            ("order/doc", events[0].encode()),
            ("order/doc", events[1].encode()),
            ("order/doc", events[2].encode()),
        ],
    )
    .await;
    regions.start_consumer();

    let client = regions.region2_pool.get().await.expect("db");
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
    let mut outcomes = Vec::new();
    for _ in 0..300 {
        outcomes = client
            .query(
                "SELECT version, outcome FROM applied_events WHERE event_id = ANY($1) ORDER BY version DESC",
                &[&ids],
            )
            .await
            .expect("outcomes")
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
            .collect();
        if outcomes.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        outcomes,
        [
            (5, "applied".to_owned()),
            (4, "stale".to_owned()),
            (3, "stale".to_owned())
        ]
    );
    let row = client
        .query_one(
            "SELECT version, deleted FROM documents WHERE collection = 'order' AND id = 'doc'",
            &[],
        )
        .await
        .expect("document");
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (5, true));
    // The consumer updates Redis just after its commit, so the Read API may serve the cached
    // version 1 for that moment; it must then answer 404, and never one of the stale upserts.
    let mut status = 0;
    for _ in 0..100 {
        let response = regions.region2_get("/v1/order/doc").await;
        status = response.status().as_u16();
        if status == 404 {
            break;
        }
        let body: serde_json::Value = response.json().await.expect("body");
        assert_eq!(
            body["version"], 1,
            "only the old version may be served meanwhile"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 404);
}
