//! The change event's schema versions: what the relay writes (version 2: origin region, write epoch
//! and sequence), what the consumer still reads (version 1, from before origins), and what it
//! holds back (a newer version: never misapplied, never dead-lettered).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tandem_core::event::{ChangeEvent, DocumentState, EventHeaders, Origin, SCHEMA_VERSION};
use tandem_tests::TwoRegions;

/// A change event of `collection/id`, version 1, as the relay of `origin` writes it.
fn event(collection: &str, id: &str, origin: &Origin) -> ChangeEvent {
    let state: DocumentState = serde_json::from_value(json!({
        "collection": collection, "id": id, "version": 1, "data": {"id": id},
        "updated_at": "2026-12-02T10:00:00Z"
    }))
    .expect("state");
    ChangeEvent::new(
        uuid::Uuid::now_v7(),
        origin,
        time::OffsetDateTime::now_utc(),
        state,
    )
}

/// Sends one record to an explicit partition; returns its offset.
async fn send(
    regions: &TwoRegions,
    partition: i32,
    event: &ChangeEvent,
    body: Vec<u8>,
    schema: Option<&str>,
) -> i64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .create()
        .expect("producer");
    let mut headers = EventHeaders::change(event.id, false, &event.data.collection, None);
    headers.schema = schema.map(str::to_owned);
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers.encode() {
        owned = owned.insert(Header {
            key: name,
            value: Some(&value),
        });
    }
    let delivery = producer
        .send(
            FutureRecord::to(&regions.topic)
                .partition(partition)
                .key(event.partition_key())
                .headers(owned)
                .payload(&body),
            Duration::from_secs(5),
        )
        .await
        .expect("produce");
    delivery.offset
}

async fn wait_status(regions: &TwoRegions, path: &str, status: u16) {
    for _ in 0..300 {
        if regions.region2_get(path).await.status() == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Region 2 never answered {status} on {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_their_origin_and_version_1_events_still_apply() {
    let regions = TwoRegions::start().await;
    let written = regions.region1.put("origin", "a", &json!({"n": 1})).await;
    assert_eq!(written.status(), 201);
    regions.wait_converged(Duration::from_secs(30)).await;
    let seq: i64 = regions
        .region1
        .pool
        .get()
        .await
        .expect("db")
        .query_one("SELECT seq FROM outbox WHERE document_id = 'a'", &[])
        .await
        .expect("seq")
        .get(0);

    // What the relay published, read back from the broker.
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .set("group.id", "schema-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    reader.subscribe(&[&regions.topic]).expect("subscribe");
    let mut found = None;
    for _ in 0..200 {
        let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) else {
            continue;
        };
        if message.key() == Some(b"origin/a".as_slice()) {
            let schema = message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "tandem-schema")
                    .and_then(|h| h.value.map(<[u8]>::to_vec))
            });
            let body: Value =
                serde_json::from_slice(message.payload().unwrap_or_default()).expect("json body");
            found = Some((schema, body));
            break;
        }
    }
    let (schema, body) = found.expect("the relay published origin/a");
    assert_eq!(
        schema.as_deref(),
        Some(SCHEMA_VERSION.to_string().as_bytes())
    );
    assert_eq!(body["tandemschema"], SCHEMA_VERSION);
    assert_eq!(body["originregion"], "region1");
    assert_eq!(body["writeepoch"], 1);
    assert_eq!(body["sequence"], seq);

    // A version 1 event, as relays before origins wrote it: no header, no origin attributes.
    let old = event("origin", "v1", &Origin::new("region1", 1, 1));
    let mut v1 = serde_json::to_value(&old).expect("json");
    for attribute in ["tandemschema", "originregion", "writeepoch", "sequence"] {
        v1.as_object_mut().expect("object").remove(attribute);
    }
    send(&regions, 0, &old, v1.to_string().into_bytes(), None).await;
    wait_status(&regions, "/v1/origin/v1", 200).await;
    let letters: i64 = regions
        .region2_pool
        .get()
        .await
        .expect("db")
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(letters, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_newer_schema_holds_its_partition_back_and_nothing_else() {
    let mut regions = TwoRegions::start().await;
    regions.wait_converged(Duration::from_secs(30)).await;
    let origin = Origin::new("region1", 1, 1);
    let newer_version = SCHEMA_VERSION + 1;

    // Partition 0: an event of a newer version, then an ordinary one behind it.
    let newer = event("newer", "held", &origin);
    let mut newer_body = newer.clone();
    newer_body.tandemschema = Some(newer_version);
    let held_at = send(
        &regions,
        0,
        &newer,
        newer_body.encode(),
        Some(&newer_version.to_string()),
    )
    .await;
    let behind = event("newer", "behind", &origin);
    send(&regions, 0, &behind, behind.encode(), Some("2")).await;
    // Partition 1 goes on.
    let elsewhere = event("newer", "elsewhere", &origin);
    send(&regions, 1, &elsewhere, elsewhere.encode(), Some("2")).await;
    wait_status(&regions, "/v1/newer/elsewhere", 200).await;

    let port = regions.consumer_ports[0];
    for _ in 0..100 {
        if regions
            .metric(port, "tandem_consumer_held_partitions")
            .await
            == Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        regions
            .metric(port, "tandem_consumer_held_partitions")
            .await,
        Some(1.0)
    );
    assert!(
        regions
            .metric(port, "tandem_consumer_events_total{outcome=\"held_back\"}")
            .await
            .is_some_and(|n| n >= 1.0)
    );
    assert!(
        regions.consumers[0]
            .log_tail()
            .contains("upgrade the consumers before the relay"),
        "the consumer says why:\n{}",
        regions.consumers[0].log_tail()
    );

    // Held, not applied, not dead-lettered; the position stays before the newer event, even
    // across a restart of the consumer.
    for round in 0..2 {
        assert_eq!(regions.region2_get("/v1/newer/held").await.status(), 404);
        assert_eq!(regions.region2_get("/v1/newer/behind").await.status(), 404);
        let client = regions.region2_pool.get().await.expect("db");
        let letters: i64 = client
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(letters, 0);
        let stored: Option<i64> = client
            .query_opt(
                "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = 0",
                &[&regions.topic],
            )
            .await
            .expect("position")
            .map(|row| row.get(0));
        assert!(
            stored.is_none_or(|next| next <= held_at),
            "the position stays before the held event ({stored:?}, event at {held_at})"
        );
        if round == 0 {
            regions.consumers[0].signal("KILL");
            regions.start_consumer();
            let later = event("newer", "after-restart", &origin);
            send(&regions, 1, &later, later.encode(), Some("2")).await;
            wait_status(&regions, "/v1/newer/after-restart", 200).await;
        }
    }
}
