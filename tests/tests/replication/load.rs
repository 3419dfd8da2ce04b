use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tandem_tests::TwoRegions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_writes_over_a_hundred_documents_converge_exactly() {
    let regions = TwoRegions::start().await;
    let app = &regions.region1;
    let writers = (0..8u64).map(|w| {
        let app_client = app.client.clone();
        let base = app.write_url.clone();
        let token = app.token.clone();
        tokio::spawn(async move {
            for n in 0..125u64 {
                let i = w * 125 + n;
                let url = format!("{base}/v1/mixed/d{}", (i * 37) % 100);
                let request = match i % 10 {
                    7 => app_client
                        .request(Method::PATCH, &url)
                        .header("content-type", "application/merge-patch+json")
                        .body(json!({"p": i}).to_string()),
                    8 | 9 => app_client.request(Method::DELETE, &url),
                    _ => app_client.put(&url).json(&json!({"i": i})),
                };
                let status = request
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("send")
                    .status()
                    .as_u16();
                assert!(matches!(status, 200 | 201 | 204 | 404), "status {status}");
            }
        })
    });
    for writer in futures_util::future::join_all(writers).await {
        writer.expect("writer");
    }
    regions.wait_converged(Duration::from_secs(60)).await;
    let client = regions.region2_pool.get().await.expect("db");
    let applied: i64 = client
        .query_one("SELECT count(*) FROM applied_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        applied,
        app.count("outbox").await,
        "every event applied once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_updates_of_one_document_never_go_backwards_in_region2() {
    let regions = TwoRegions::start().await;
    let app = &regions.region1;
    app.put("ticker", "t", &json!({"n": 0})).await;
    let stop = Arc::new(AtomicBool::new(false));
    let observer = {
        let client = app.client.clone();
        let url = format!("{}/v1/ticker/t", regions.region2_read_url);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(response) = client.get(&url).send().await {
                    if response.status() == 200 {
                        let body: Value = response.json().await.expect("json");
                        seen.push(body["version"].as_i64().expect("version"));
                    }
                }
            }
            seen
        })
    };
    for n in 1..=300 {
        assert_eq!(app.put("ticker", "t", &json!({"n": n})).await.status(), 200);
    }
    regions.wait_converged(Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = observer.await.expect("observer");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "Region 2 went backwards: {seen:?}"
    );
    assert!(!seen.is_empty());
    // The events themselves arrived in order: no stale outcome was ever needed.
    let client = regions.region2_pool.get().await.expect("db");
    let stale: i64 = client
        .query_one(
            "SELECT count(*) FROM applied_events WHERE outcome = 'stale'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stale, 0);
}
