//! Replication: Region 1 outbox → relay → Apache Kafka → Region 2 consumer → Region 2
//! PostgreSQL, Redis and Read API; with crashes, outages and data loss along the way.

mod cli;
mod cluster;
mod consistency;
mod edge;
mod end_to_end;
mod failures;
mod hostile;
mod housekeeping;
mod lambda;
mod load;
mod scale_out;
mod schema;
mod switchover;
mod traces;
mod truth;

/// Helpers shared by the replication tests.
pub mod support {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use reqwest::Method;
    use serde_json::json;
    use tandem_tests::{TestApp, TwoRegions};

    /// Every Region 1 event was applied in Region 2 exactly once: none lost, none twice.
    pub async fn assert_each_event_applied_once(regions: &TwoRegions) {
        let one = regions.region1.pool.get().await.expect("db");
        let mut expected: Vec<uuid::Uuid> = one
            .query("SELECT event_id FROM outbox", &[])
            .await
            .expect("events")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let two = regions.region2_pool.get().await.expect("db");
        let mut applied: Vec<uuid::Uuid> = two
            .query("SELECT event_id FROM applied_events", &[])
            .await
            .expect("applied")
            .iter()
            .map(|r| r.get(0))
            .collect();
        expected.sort();
        applied.sort();
        assert_eq!(
            applied.len(),
            expected.len(),
            "events lost or applied twice"
        );
        assert_eq!(applied, expected);
    }

    /// Sends one record straight to the topic, as a foreign or broken producer would; returns
    /// where it landed, `(partition, offset)`.
    pub async fn produce_raw(regions: &TwoRegions, key: &str, payload: &[u8]) -> (i32, i64) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", regions.broker.address())
            .create()
            .expect("producer");
        let delivery = producer
            .send(
                FutureRecord::to(&regions.topic).key(key).payload(payload),
                Duration::from_secs(5),
            )
            .await
            .expect("produce");
        (delivery.partition, delivery.offset)
    }

    /// Region 1's outbox rows not yet published.
    pub async fn unpublished(regions: &TwoRegions) -> i64 {
        unpublished_in(&regions.region1.pool.get().await.expect("db")).await
    }

    /// The outbox rows not yet published in the database `client` is connected to.
    pub async fn unpublished_in(client: &deadpool_postgres::Client) -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .expect("count")
            .get(0)
    }

    /// Waits until the relay has published every outbox row of Region 1.
    pub async fn wait_published(regions: &TwoRegions) {
        for _ in 0..300 {
            if unpublished(regions).await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the relay did not publish the outbox within 30 s");
    }

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
