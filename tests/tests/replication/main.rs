//! Replication: Region 1 outbox → relay → Kafka-protocol broker → Region 2 consumer → Region 2
//! PostgreSQL, Redis and Read API; with crashes, outages and data loss along the way.

mod consistency;
mod edge;
mod end_to_end;
mod failures;
mod hostile;
mod load;
mod truth;

/// Helpers shared by the replication tests.
pub mod support {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use reqwest::Method;
    use serde_json::json;
    use tandem_tests::TestApp;

    /// Writes in the background (PUT/PATCH/DELETE over `documents` ids) until stopped; every
    /// write must succeed (Region 1 never depends on Kafka). Returns the number of writes.
    pub fn spawn_writer(
        app: &TestApp,
        collection: &'static str,
        documents: u32,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<u64> {
        let client = app.client.clone();
        let base = app.write_url.clone();
        let token = app.token.clone();
        let count = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = i % u64::from(documents);
                let url = format!("{base}/v1/{collection}/d{id}");
                let request = match i % 7 {
                    5 => client
                        .request(Method::PATCH, &url)
                        .header("content-type", "application/merge-patch+json")
                        .body(json!({"patched": i}).to_string()),
                    6 => client.request(Method::DELETE, &url),
                    _ => client
                        .put(&url)
                        .json(&json!({"i": i, "payload": "x".repeat(64)})),
                };
                let response = request
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("write sent");
                let status = response.status().as_u16();
                // PATCH/DELETE of an absent document is a legitimate 404.
                assert!(
                    matches!(status, 200 | 201 | 204 | 404),
                    "write failed with {status}: {}",
                    response.text().await.unwrap_or_default()
                );
                i += 1;
                count.fetch_add(1, Ordering::Relaxed);
            }
            count.load(Ordering::Relaxed)
        })
    }
}
