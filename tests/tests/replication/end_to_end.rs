use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tandem_tests::TwoRegions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_region1_appear_in_region2_with_the_same_versions_data_and_tombstones() {
    let regions = TwoRegions::start().await;
    let app = &regions.region1;
    app.put("orders", "a", &json!({"total": 1})).await;
    app.put("orders", "a", &json!({"total": 2})).await;
    app.put("orders", "b", &json!({"total": 3})).await;
    let patched = app
        .write(Method::PATCH, "/v1/orders/b")
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"paid": true}"#)
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    assert_eq!(
        app.write(Method::DELETE, "/v1/orders/a")
            .send()
            .await
            .expect("delete")
            .status(),
        204
    );
    regions.wait_converged(Duration::from_secs(30)).await;

    let b = regions.region2_get("/v1/orders/b").await;
    assert_eq!(b.status(), 200);
    assert_eq!(b.headers()["x-tandem-region"], "region2");
    assert_eq!(b.headers()["etag"], "\"2\"");
    assert!(b.headers().contains_key("x-tandem-replication-lag-ms"));
    let body: Value = b.json().await.expect("json");
    assert_eq!(body["data"], json!({"total": 3, "paid": true}));
    let region1_body: Value = app.get("/v1/orders/b").await.json().await.expect("json");
    assert_eq!(
        body, region1_body,
        "Region 2 serves the same representation"
    );
    assert_eq!(regions.region2_get("/v1/orders/a").await.status(), 404);
    let list: Value = regions
        .region2_get("/v1/orders")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));

    // Region 2 refuses writes.
    let write = app
        .client
        .put(format!("{}/v1/orders/c", regions.region2_read_url))
        .json(&json!({}))
        .send()
        .await
        .expect("put");
    assert_eq!(write.status(), 405);

    // A recreated document continues its version in Region 2 as well.
    app.put("orders", "a", &json!({"total": 9})).await;
    regions.wait_converged(Duration::from_secs(30)).await;
    let a: Value = regions
        .region2_get("/v1/orders/a")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(a["version"], 4);

    // The workers' operations endpoints: replication lag and consumer lag are exported.
    let consumer_metrics = app
        .client
        .get(format!(
            "http://127.0.0.1:{}/metrics",
            regions.consumer_ports[0]
        ))
        .send()
        .await
        .expect("consumer metrics")
        .text()
        .await
        .expect("text");
    assert!(
        consumer_metrics.contains("tandem_replication_lag_seconds_count"),
        "{consumer_metrics}"
    );
    assert!(
        consumer_metrics.contains(r#"tandem_consumer_events_total{outcome="applied"}"#),
        "{consumer_metrics}"
    );
    assert!(
        consumer_metrics.contains("tandem_consumer_lag "),
        "{consumer_metrics}"
    );
    assert!(
        consumer_metrics.contains("tandem_consumer_leader 1"),
        "{consumer_metrics}"
    );
    let relay_metrics = app
        .client
        .get(format!(
            "http://127.0.0.1:{}/metrics",
            regions.relay_ports[0]
        ))
        .send()
        .await
        .expect("relay metrics")
        .text()
        .await
        .expect("text");
    assert!(
        relay_metrics.contains("tandem_relay_events_published_total"),
        "{relay_metrics}"
    );
    assert!(
        relay_metrics.contains("tandem_relay_leader 1"),
        "{relay_metrics}"
    );
    for port in [regions.relay_ports[0], regions.consumer_ports[0]] {
        let ready = app
            .client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 200);
    }

    // Each event was applied exactly once.
    let client = regions.region2_pool.get().await.expect("db");
    let applied: i64 = client
        .query_one("SELECT count(*) FROM applied_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(applied, app.count("outbox").await);
}

/// The relay wakes on the notification the Write API sends after each commit (migration V9
/// took it out of the write transaction, where it serialised durable commits): with the
/// relay's poll set to ten minutes, every write still reaches Region 2, each on its own
/// wake-up; and no trigger on the outbox notifies inside a writing transaction any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_wakes_after_each_commit_without_polling() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_consumer();
    regions.start_relay_with(&[("RELAY_POLL_INTERVAL_MS", "600000")]);
    let app = &regions.region1;
    let notifying_triggers: i64 = app
        .pool
        .get()
        .await
        .expect("connection")
        .query_one(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = 'outbox'::regclass AND p.prosrc ILIKE '%notify%'",
            &[],
        )
        .await
        .expect("triggers")
        .get(0);
    assert_eq!(notifying_triggers, 0, "a write transaction notifies");

    for n in 1..=5i64 {
        app.put("wake", "doc", &json!({"n": n})).await;
        // Without a wake-up the relay would not look again for ten minutes.
        regions
            .wait_region2_version("/v1/wake/doc", n, Duration::from_secs(60))
            .await;
        // The relay is idle again before the next write: that one needs a wake-up of its own.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
