//! Region 2's apply as a Lambda function behind a Kafka event source mapping
//! (`tandem-region2-apply-lambda`). The relay publishes Region 1's writes to the real broker;
//! the tests read those records back, wrap them in the event AWS sends for an MSK (or a
//! self-managed Kafka) event source mapping, and drive the function through lambda_runtime's
//! service path, as `lambda_runtime::run` does in AWS: the JSON is deserialised into
//! `LambdaEvent<KafkaEvent>`, the answer serialised back. Region 2 is then judged by its
//! database, its Read API (over its Redis) and its `/readyz`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use lambda_runtime::{Context, LambdaEvent};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, Timestamp, TopicPartitionList};
use reqwest::Method;
use serde_json::{Value, json};
use tandem_core::event::{HEADER_EVENT_TYPE, TYPE_HEARTBEAT};
use tandem_region2_apply::lambda::{KafkaApply, KafkaEvent};
use tandem_region2_apply::metrics::OutcomeLabels;
use tandem_region2_apply::{Applier, ConsumerMetrics};
use tandem_store::cache::{Cache, CacheSettings};
use tandem_store::db::DatabaseSettings;
use tandem_tests::{ManagedProcess, TwoRegions, binary, scratch_dir, serve};
use tokio::sync::{Mutex, mpsc};
use tower::ServiceExt;

use crate::support::{assert_each_event_applied_once, produce_raw, wait_published};

/// The topic's partition count in the harness (`KAFKA_TOPIC_PARTITIONS`).
const PARTITIONS: i32 = 3;

/// The function as a Lambda instance would hold it, over Region 2's database and Redis.
async fn function(regions: &TwoRegions, lock_timeout: Option<Duration>) -> KafkaApply {
    let mut database = DatabaseSettings::from_url(&regions.region2_database_url);
    if let Some(timeout) = lock_timeout {
        database.limits.lock_timeout = timeout;
    }
    let pool = tandem_store::db::connect_pool(&database)
        .await
        .expect("Region 2 pool");
    let mut cache = CacheSettings::from_url(&regions.region2_redis_url);
    cache.key_prefix = regions.region2_key_prefix.clone();
    let applier = Applier::new(
        pool,
        Cache::new(cache).expect("Region 2 cache"),
        Arc::new(ConsumerMetrics::new()),
    );
    KafkaApply::start(applier, &regions.topic, PARTITIONS).await
}

/// One invocation: the event's JSON text deserialised as the runtime does, the function's
/// service called with it, its answer as the JSON the runtime sends back to Lambda.
async fn invoke(apply: &KafkaApply, event: &Value) -> Value {
    let body = serde_json::to_vec(event).expect("event JSON");
    let event: KafkaEvent = serde_json::from_slice(&body).expect("AWS's Kafka event shape");
    let response = apply
        .clone()
        .service()
        .oneshot(LambdaEvent::new(event, Context::default()))
        .await
        .expect("the function answers");
    serde_json::to_value(response).expect("the answer serialises")
}

fn no_failures() -> Value {
    json!({"batchItemFailures": []})
}

/// How many messages the function counted with this outcome.
fn outcome_count(apply: &KafkaApply, outcome: &'static str) -> u64 {
    apply
        .applier()
        .metrics
        .events
        .get_or_create(&OutcomeLabels { outcome })
        .get()
}

/// Every record of the topic from `from` (partition -> first offset; the beginning for the
/// others) up to the partitions' ends as they are now, in offset order per partition.
async fn read_topic(regions: &TwoRegions, from: &HashMap<i32, i64>) -> Vec<OwnedMessage> {
    let brokers = regions.broker.address();
    let topic = regions.topic.clone();
    let from = from.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("lambda-test-{}", uuid::Uuid::now_v7()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let timeout = Duration::from_secs(10);
        let mut ends = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            let (_, high) = consumer
                .fetch_watermarks(&topic, partition, timeout)
                .expect("watermarks");
            let start = from.get(&partition).copied().unwrap_or(0);
            if high > start {
                ends.insert(partition, high);
                assignment
                    .add_partition_offset(&topic, partition, Offset::Offset(start))
                    .expect("assign");
            }
        }
        consumer.assign(&assignment).expect("assign");
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ends.is_empty() {
            assert!(Instant::now() < deadline, "the records did not arrive");
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.expect("a record").detach();
            let end = ends.get(&message.partition()).copied();
            if end.is_some_and(|end| message.offset() < end) {
                if end == Some(message.offset() + 1) {
                    ends.remove(&message.partition());
                }
                records.push(message);
            }
        }
        records.sort_by_key(|m| (m.partition(), m.offset()));
        records
    })
    .await
    .expect("reader")
}

/// Where each partition ends after these records.
fn ends(records: &[OwnedMessage]) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for record in records {
        let end = ends.entry(record.partition()).or_insert(0);
        *end = (*end).max(record.offset() + 1);
    }
    ends
}

/// A record as AWS puts it in a Kafka event: key and value base64, headers one
/// `{name: [signed bytes]}` map each.
fn aws_record(message: &OwnedMessage) -> Value {
    let headers: Vec<Value> = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    let bytes: Vec<i8> = h
                        .value
                        .unwrap_or_default()
                        .iter()
                        .map(|b| *b as i8)
                        .collect();
                    json!({ h.key: bytes })
                })
                .collect()
        })
        .unwrap_or_default();
    let (timestamp, timestamp_type) = match message.timestamp() {
        Timestamp::CreateTime(ms) => (ms, "CREATE_TIME"),
        Timestamp::LogAppendTime(ms) => (ms, "LOG_APPEND_TIME"),
        Timestamp::NotAvailable => (0, "NO_TIMESTAMP_TYPE"),
    };
    json!({
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": timestamp,
        "timestampType": timestamp_type,
        "key": message.key().map(|k| BASE64.encode(k)),
        "value": message.payload().map(|v| BASE64.encode(v)),
        "headers": headers,
    })
}

/// The event of an MSK event source mapping (`aws:kafka`) carrying these records, grouped
/// under `<topic>-<partition>` keys in offset order.
fn msk_event(regions: &TwoRegions, records: &[OwnedMessage]) -> Value {
    json!({
        "eventSource": "aws:kafka",
        "eventSourceArn": "arn:aws:kafka:us-east-1:123456789012:cluster/tandem-region1/7d1f3c2a-5b6e-4f80-9a1b-2c3d4e5f6a7b-3",
        "bootstrapServers": regions.broker.address(),
        "records": grouped(records),
    })
}

/// The same records from a self-managed Kafka event source mapping (what Region 2 uses to reach
/// the MSK cluster in Region 1 across the peering): no ARN, another `eventSource`.
fn self_managed_event(regions: &TwoRegions, records: &[OwnedMessage]) -> Value {
    json!({
        "eventSource": "SelfManagedKafka",
        "bootstrapServers": regions.broker.address(),
        "records": grouped(records),
    })
}

fn grouped(records: &[OwnedMessage]) -> BTreeMap<String, Vec<Value>> {
    let mut grouped: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for record in records {
        grouped
            .entry(format!("{}-{}", record.topic(), record.partition()))
            .or_default()
            .push(aws_record(record));
    }
    grouped
}

fn is_heartbeat(message: &OwnedMessage) -> bool {
    message.headers().is_some_and(|headers| {
        headers
            .iter()
            .any(|h| h.key == HEADER_EVENT_TYPE && h.value == Some(TYPE_HEARTBEAT.as_bytes()))
    })
}

/// The record that carries this document's newest event.
fn record_of<'a>(records: &'a [OwnedMessage], key: &str) -> &'a OwnedMessage {
    records
        .iter()
        .rev()
        .find(|m| m.key() == Some(key.as_bytes()))
        .unwrap_or_else(|| panic!("no record for {key}"))
}

async fn count(regions: &TwoRegions, sql: &str) -> i64 {
    regions
        .region2_pool
        .get()
        .await
        .expect("db")
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

/// The version Region 2's Read API serves for a document (through its Redis), or None (404).
async fn served_version(regions: &TwoRegions, path: &str) -> Option<i64> {
    let response = regions.region2_get(path).await;
    if response.status() == 404 {
        return None;
    }
    assert_eq!(response.status(), 200, "{path}");
    let body: Value = response.json().await.expect("document");
    body["version"].as_i64()
}

/// Region 2's state a delivered-again batch must leave exactly as it was.
async fn region2_state(regions: &TwoRegions) -> Vec<String> {
    let client = regions.region2_pool.get().await.expect("db");
    let mut state = Vec::new();
    for sql in [
        "SELECT event_id::text || ' ' || outcome || ' ' || applied_at::text FROM applied_events ORDER BY event_id",
        "SELECT collection || '/' || id || ' v' || version || ' ' || coalesce(data::text, 'deleted') || ' ' || updated_at::text FROM documents ORDER BY collection, id",
        "SELECT partition || ':' || \"offset\" || ' ' || reason || ' ' || received_at::text FROM dead_letters ORDER BY partition, \"offset\"",
        "SELECT partition || ' -> ' || next_offset FROM consumer_offsets ORDER BY partition",
    ] {
        for row in client.query(sql, &[]).await.expect(sql) {
            state.push(row.get(0));
        }
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_real_records_brings_region2_up_to_date_through_the_function() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    let apply = function(&regions, None).await;

    for i in 0..6 {
        let response = regions
            .region1
            .put("notes", &format!("n{i}"), &json!({"i": i, "text": "hello"}))
            .await;
        assert_eq!(response.status(), 201);
    }
    let patched = regions
        .region1
        .write(Method::PATCH, "/v1/notes/n0")
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"text":"patched"}"#)
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    let deleted = regions
        .region1
        .write(Method::DELETE, "/v1/notes/n1")
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    wait_published(&regions).await;

    let records = read_topic(&regions, &HashMap::new()).await;
    assert!(records.iter().any(is_heartbeat), "the relay's heartbeats");
    let answer = invoke(&apply, &msk_event(&regions, &records)).await;
    assert_eq!(answer, no_failures());

    // Region 2 holds exactly Region 1's documents, each event applied once.
    assert_eq!(
        TwoRegions::snapshot(&regions.region2_pool).await,
        TwoRegions::snapshot(&regions.region1.pool).await
    );
    assert_each_event_applied_once(&regions).await;
    assert_eq!(outcome_count(&apply, "applied"), 8);
    // Its Read API (over its Redis) serves them.
    let response = regions.region2_get("/v1/notes/n0").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("document");
    assert_eq!(body["version"], 2);
    assert_eq!(body["data"], json!({"i": 0, "text": "patched"}));
    assert_eq!(served_version(&regions, "/v1/notes/n1").await, None);
    assert_eq!(served_version(&regions, "/v1/notes/n5").await, Some(1));
    // The positions after the batch are recorded with the data, so the pod could take over.
    let positions: i64 = count(
        &regions,
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets",
    )
    .await;
    assert_eq!(positions, ends(&records).values().sum::<i64>());
    // The heartbeats the batch carried make Region 2's lag known and small: it is ready.
    let lag = regions
        .wait_region2_readiness(true, Duration::from_secs(10))
        .await;
    assert!(!lag.is_empty(), "the readiness names the lag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_in_a_batch_are_dead_lettered_alone_and_the_rest_applied() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    let apply = function(&regions, None).await;

    for i in 0..4 {
        let response = regions
            .region1
            .put("orders", &format!("o{i}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), 201);
    }
    // Two records a foreign producer wrote: bytes that are no event at all, and one whose
    // value the event carries as text that is not base64.
    let garbage: &[u8] = b"\xff\xfe not an event \x00";
    produce_raw(&regions, "poison/garbage", garbage).await;
    produce_raw(&regions, "poison/base64", b"{}").await;
    for i in 4..6 {
        let response = regions
            .region1
            .put("orders", &format!("o{i}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), 201);
    }
    wait_published(&regions).await;

    let records = read_topic(&regions, &HashMap::new()).await;
    let garbage_record = record_of(&records, "poison/garbage");
    let base64_record = record_of(&records, "poison/base64");
    let mut event = msk_event(&regions, &records);
    let key = format!("{}-{}", regions.topic, base64_record.partition());
    for record in event["records"][&key].as_array_mut().expect("partition") {
        if record["offset"] == base64_record.offset() {
            record["value"] = json!("%%% not base64 %%%");
        }
    }

    assert_eq!(invoke(&apply, &event).await, no_failures());

    let client = regions.region2_pool.get().await.expect("db");
    let letters = client
        .query(
            "SELECT partition, \"offset\", payload, reason FROM dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("dead letters");
    let mut found: Vec<(i32, i64)> = letters.iter().map(|r| (r.get(0), r.get(1))).collect();
    found.sort_unstable();
    let mut expected = vec![
        (garbage_record.partition(), garbage_record.offset()),
        (base64_record.partition(), base64_record.offset()),
    ];
    expected.sort_unstable();
    assert_eq!(found, expected, "exactly the two poison records");
    for letter in &letters {
        let offset: i64 = letter.get(1);
        let payload: Vec<u8> = letter.get(2);
        let reason: String = letter.get(3);
        if offset == garbage_record.offset()
            && letter.get::<_, i32>(0) == garbage_record.partition()
        {
            assert_eq!(payload, garbage, "stored byte for byte");
        } else {
            assert_eq!(payload, b"%%% not base64 %%%", "kept as it came");
            assert!(reason.contains("not valid base64"), "{reason}");
        }
    }
    assert_eq!(outcome_count(&apply, "dead_lettered"), 2);
    // Every event around them was applied.
    assert_eq!(
        TwoRegions::snapshot(&regions.region2_pool).await,
        TwoRegions::snapshot(&regions.region1.pool).await
    );
    assert_each_event_applied_once(&regions).await;
    assert_eq!(served_version(&regions, "/v1/orders/o5").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_whose_header_names_hold_nul_is_dead_lettered() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    let apply = function(&regions, None).await;

    let (partition, offset) = produce_raw(&regions, "poison/nul-name", b"not an event").await;
    for i in 0..4 {
        let response = regions
            .region1
            .put("names", &format!("n{i}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), 201);
    }
    wait_published(&regions).await;
    let records = read_topic(&regions, &HashMap::new()).await;
    // The event carries header names as JSON strings: nothing stops one from holding a NUL
    // (which PostgreSQL text cannot store), or other control characters.
    let mut event = msk_event(&regions, &records);
    let key = format!("{}-{partition}", regions.topic);
    let mut found = false;
    for record in event["records"][&key].as_array_mut().expect("partition") {
        if record["offset"] == offset {
            record["headers"] = json!([{"x\u{0}name": [1, 2]}, {"\u{1}\u{7f}\u{0}": [-1]}]);
            found = true;
        }
    }
    assert!(found, "the poison record is in the event");

    assert_eq!(invoke(&apply, &event).await, no_failures());

    let client = regions.region2_pool.get().await.expect("db");
    let letters = client
        .query(
            "SELECT partition, \"offset\", payload, header_names, header_values, reason \
             FROM dead_letters",
            &[],
        )
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.get::<_, i32>(0), letter.get::<_, i64>(1)),
        (partition, offset)
    );
    assert_eq!(letter.get::<_, Vec<u8>>(2), b"not an event");
    let names: Vec<Option<String>> = letter.get(3);
    assert_eq!(
        names,
        vec![
            Some("x\\0name".to_owned()),
            Some("\u{1}\u{7f}\\0".to_owned())
        ]
    );
    let values: Vec<Option<Vec<u8>>> = letter.get(4);
    assert_eq!(values, vec![Some(vec![1, 2]), Some(vec![0xff])]);
    let reason: String = letter.get(5);
    assert!(reason.starts_with("undecodable event"), "{reason}");
    // Everything around it was applied.
    assert_eq!(
        TwoRegions::snapshot(&regions.region2_pool).await,
        TwoRegions::snapshot(&regions.region1.pool).await
    );
    assert_each_event_applied_once(&regions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_again_twice_applies_nothing_twice() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    let apply = function(&regions, None).await;

    for i in 0..5 {
        let response = regions
            .region1
            .put("items", &format!("i{i}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), 201);
    }
    for i in 0..2 {
        let response = regions
            .region1
            .put("items", &format!("i{i}"), &json!({"i": i, "again": true}))
            .await;
        assert_eq!(response.status(), 200);
    }
    let deleted = regions
        .region1
        .write(Method::DELETE, "/v1/items/i4")
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    produce_raw(&regions, "poison/replayed", b"not json").await;
    wait_published(&regions).await;

    let records = read_topic(&regions, &HashMap::new()).await;
    let event = msk_event(&regions, &records);
    let events = 8;
    assert_eq!(invoke(&apply, &event).await, no_failures());
    assert_eq!(outcome_count(&apply, "applied"), events);
    assert_eq!(outcome_count(&apply, "duplicate"), 0);
    let state = region2_state(&regions).await;
    let served = served_version(&regions, "/v1/items/i0").await;
    assert_eq!(served, Some(2));

    // Lambda delivers the same batch again (a retried invocation whose first attempt did
    // commit), twice: nothing is applied again, nothing changes.
    for round in 1..=2 {
        assert_eq!(invoke(&apply, &event).await, no_failures());
        assert_eq!(
            outcome_count(&apply, "applied"),
            events,
            "round {round}: nothing applied again"
        );
        assert_eq!(
            outcome_count(&apply, "duplicate"),
            events * round,
            "round {round}: every event recognised by its id"
        );
        assert_eq!(region2_state(&regions).await, state, "round {round}");
        assert_eq!(served_version(&regions, "/v1/items/i0").await, served);
        assert_eq!(served_version(&regions, "/v1/items/i4").await, None);
    }
    assert_each_event_applied_once(&regions).await;
    assert_eq!(
        count(&regions, "SELECT count(*) FROM dead_letters").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_the_database_refuses_is_reported_from_its_first_record_and_alone_retried() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    // A short lock_timeout: a row lock held elsewhere fails the apply quickly (55P03).
    let apply = function(&regions, Some(Duration::from_millis(300))).await;

    // Documents until two partitions hold one each.
    for i in 0..12 {
        let response = regions
            .region1
            .put("spread", &format!("s{i}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), 201);
    }
    wait_published(&regions).await;
    let first = read_topic(&regions, &HashMap::new()).await;
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &first)).await,
        no_failures()
    );
    let mut by_partition: BTreeMap<i32, String> = BTreeMap::new();
    for i in 0..12 {
        let key = format!("spread/s{i}");
        by_partition
            .entry(record_of(&first, &key).partition())
            .or_insert(format!("s{i}"));
    }
    assert!(by_partition.len() >= 2, "12 documents over 3 partitions");
    let mut chosen = by_partition.into_iter();
    let (locked_partition, locked_id) = chosen.next().expect("one");
    let (_, free_id) = chosen.next().expect("another");

    // New versions of both, then the locked document's row held in Region 2.
    for id in [&locked_id, &free_id] {
        let response = regions
            .region1
            .put("spread", id, &json!({"second": true}))
            .await;
        assert_eq!(response.status(), 200);
    }
    wait_published(&regions).await;
    let second = read_topic(&regions, &ends(&first)).await;
    let (mut holder, connection) =
        tokio_postgres::connect(&regions.region2_database_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    let lock = holder.transaction().await.expect("begin");
    lock.execute(
        "SELECT 1 FROM documents WHERE collection = 'spread' AND id = $1 FOR UPDATE",
        &[&locked_id],
    )
    .await
    .expect("row lock");

    let answer = invoke(&apply, &msk_event(&regions, &second)).await;

    // Exactly the locked partition's records, from its first on, are reported.
    let locked_key = format!("{}-{locked_partition}", regions.topic);
    let expected: Vec<Value> = second
        .iter()
        .filter(|m| m.partition() == locked_partition)
        .map(|m| json!({"itemIdentifier": {"topic-partition": locked_key, "offset": m.offset()}}))
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(answer, json!({ "batchItemFailures": expected }));
    // The other partitions' records were applied; the locked document was not.
    assert_eq!(
        served_version(&regions, &format!("/v1/spread/{free_id}")).await,
        Some(2)
    );
    assert_eq!(
        served_version(&regions, &format!("/v1/spread/{locked_id}")).await,
        Some(1)
    );
    assert_eq!(
        count(&regions, "SELECT count(*) FROM dead_letters").await,
        0,
        "a transient failure never dead-letters"
    );

    // Lambda delivers the reported records again, and only them, once the lock is gone.
    lock.rollback().await.expect("release");
    let retried: Vec<OwnedMessage> = second
        .iter()
        .filter(|m| m.partition() == locked_partition)
        .cloned()
        .collect();
    let duplicates = outcome_count(&apply, "duplicate");
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &retried)).await,
        no_failures()
    );
    assert_eq!(
        outcome_count(&apply, "duplicate"),
        duplicates,
        "the retry re-applied nothing that was applied"
    );
    assert_eq!(
        served_version(&regions, &format!("/v1/spread/{locked_id}")).await,
        Some(2)
    );
    assert_eq!(
        TwoRegions::snapshot(&regions.region2_pool).await,
        TwoRegions::snapshot(&regions.region1.pool).await
    );
    assert_each_event_applied_once(&regions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region2_lag_follows_the_function_invocations() {
    let mut regions = TwoRegions::start_without_workers_max_lag(Duration::from_secs(5)).await;
    regions.start_relay();
    let apply = function(&regions, None).await;
    let response = regions.region1.put("lag", "doc", &json!({"v": 1})).await;
    assert_eq!(response.status(), 201);
    wait_published(&regions).await;
    let records = read_topic(&regions, &HashMap::new()).await;
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &records)).await,
        no_failures()
    );
    regions
        .wait_region2_readiness(true, Duration::from_secs(30))
        .await;

    // The event source stops invoking (throttled, disabled, failing to reach the brokers):
    // the relay's heartbeats pile up unapplied and the lag grows past the threshold.
    let line = regions
        .wait_region2_readiness(false, Duration::from_secs(30))
        .await;
    assert!(!line.is_empty(), "the readiness names the lag");

    // Invocations resume (from a self-managed Kafka event source this time): ready again.
    let fresh = read_topic(&regions, &ends(&records)).await;
    assert!(fresh.iter().any(is_heartbeat), "heartbeats kept coming");
    assert_eq!(
        invoke(&apply, &self_managed_event(&regions, &fresh)).await,
        no_failures()
    );
    regions
        .wait_region2_readiness(true, Duration::from_secs(30))
        .await;
    assert_eq!(served_version(&regions, "/v1/lag/doc").await, Some(1));
}

/// A stand-in for the Lambda Runtime API (what `cargo lambda watch` also plays): hands the
/// queued events to the function's runtime loop and passes on what it posts back.
fn runtime_api(
    events: mpsc::UnboundedReceiver<Value>,
    posted: mpsc::UnboundedSender<(String, Value)>,
) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::routing::{get, post};
    type Api = (
        Arc<Mutex<mpsc::UnboundedReceiver<Value>>>,
        mpsc::UnboundedSender<(String, Value)>,
    );
    async fn next(State((events, _)): State<Api>) -> axum::response::Response {
        // Long-polls like Lambda: the runtime waits here for its next invocation.
        let event = events.lock().await.recv().await.unwrap_or(Value::Null);
        let deadline = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() + 60_000)
            .unwrap_or_default();
        axum::response::Response::builder()
            .header(
                "lambda-runtime-aws-request-id",
                uuid::Uuid::now_v7().to_string(),
            )
            .header("lambda-runtime-deadline-ms", deadline.to_string())
            .header(
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-west-2:123456789012:function:tandem-region2-apply",
            )
            .header("content-type", "application/json")
            .body(axum::body::Body::from(event.to_string()))
            .expect("response")
    }
    async fn record(
        State((_, posted)): State<Api>,
        Path((_, what)): Path<(String, String)>,
        body: axum::body::Bytes,
    ) -> axum::http::StatusCode {
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let _ = posted.send((what, body));
        axum::http::StatusCode::ACCEPTED
    }
    async fn init_error(
        State((_, posted)): State<Api>,
        body: axum::body::Bytes,
    ) -> axum::http::StatusCode {
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let _ = posted.send(("init error".to_owned(), body));
        axum::http::StatusCode::ACCEPTED
    }
    let state: Api = (Arc::new(Mutex::new(events)), posted);
    axum::Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/invocation/{id}/{what}", post(record))
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .with_state(state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binary_serves_invocations_from_the_lambda_runtime_api() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    let response = regions
        .region1
        .put("binary", "doc", &json!({"through": "the runtime loop"}))
        .await;
    assert_eq!(response.status(), 201);
    wait_published(&regions).await;
    let records = read_topic(&regions, &HashMap::new()).await;

    let (events, queued) = mpsc::unbounded_channel();
    let (posted, mut answers) = mpsc::unbounded_channel();
    let api = serve(runtime_api(queued, posted)).await;
    let dir = scratch_dir("apply-lambda");
    let env: Vec<(String, String)> = [
        ("AWS_LAMBDA_RUNTIME_API", api.trim_start_matches("http://")),
        ("AWS_LAMBDA_FUNCTION_NAME", "tandem-region2-apply"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("TANDEM_REGION", "region2"),
        ("DATABASE_URL", &regions.region2_database_url),
        ("REDIS_URL", &regions.region2_redis_url),
        ("REDIS_KEY_PREFIX", &regions.region2_key_prefix),
        ("KAFKA_TOPIC", &regions.topic),
        ("KAFKA_TOPIC_PARTITIONS", "3"),
        ("TANDEM_LOG_FORMAT", "pretty"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let function = ManagedProcess::start(
        "apply-lambda",
        &binary("tandem-region2-apply-lambda"),
        &[],
        &env,
        &dir.join("function.log"),
        "",
    )
    .expect("start tandem-region2-apply-lambda");

    // Two invocations: the batch, then the same batch delivered again.
    for round in 0..2 {
        events
            .send(self_managed_event(&regions, &records))
            .expect("queue the event");
        let (what, body) = tokio::time::timeout(Duration::from_secs(60), answers.recv())
            .await
            .unwrap_or_else(|_| panic!("no answer within 60 s:\n{}", function.log_tail()))
            .expect("an answer");
        assert_eq!(
            (what.as_str(), &body),
            ("response", &no_failures()),
            "round {round}:\n{}",
            function.log_tail()
        );
    }
    assert_eq!(served_version(&regions, "/v1/binary/doc").await, Some(1));
    assert_each_event_applied_once(&regions).await;
    // Its cold start bumped Region 2's cache generation: an invocation killed between its
    // commit and its cache update cannot leave the replaced version served past it.
    let client = redis::Client::open(regions.region2_redis_url.as_str()).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let generation: Option<i64> = redis::cmd("GET")
        .arg(format!("{}:gen", regions.region2_key_prefix))
        .query_async(&mut connection)
        .await
        .expect("generation");
    assert_eq!(generation, Some(1), "one bump, at the cold start");
    drop(function);
    let _ = std::fs::remove_dir_all(dir);
}

/// Region 2's row of `items/id`: `(version, data)`.
async fn item(regions: &TwoRegions, id: &str) -> Option<(i64, Option<Value>)> {
    let client = regions.region2_pool.get().await.expect("db");
    client
        .query_opt(
            "SELECT version, data FROM documents WHERE collection = 'items' AND id = $1",
            &[&id],
        )
        .await
        .expect("row")
        .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_events_apply_through_the_function_and_a_redelivered_one_changes_nothing() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    let apply = function(&regions, None).await;
    for id in ["a", "b"] {
        let response = regions.region1.put("items", id, &json!({"id": id})).await;
        assert_eq!(response.status(), 201);
    }
    wait_published(&regions).await;
    let first = read_topic(&regions, &HashMap::new()).await;
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &first)).await,
        no_failures()
    );

    // Drift: Region 2 ahead on `a`, other content at `b`'s version, an `x` of its own.
    let client = regions.region2_pool.get().await.expect("db");
    client
        .batch_execute(
            "UPDATE documents SET version = 7 WHERE collection = 'items' AND id = 'a'; \
             UPDATE documents SET data = '{\"tampered\": true}' WHERE collection = 'items' AND id = 'b'; \
             INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
             VALUES ('items', 'x', 3, '{\"x\": 1}', false, now(), now())",
        )
        .await
        .expect("plant drift");
    // The repairs `tandem repair` enqueues, then a later write of `a`: in one batch, the
    // repair's rule carries onto `a`'s newer version (Region 2 holds 7, Region 1 writes 2).
    for (id, seen) in [("a", 7), ("b", 1), ("x", 3)] {
        let key = tandem_core::document::DocumentKey::new(
            tandem_core::document::Collection::parse("items").expect("collection"),
            tandem_core::document::DocumentId::parse(id).expect("id"),
        );
        tandem_store::documents::repair(&regions.region1.pool, &key, Some(seen), false)
            .await
            .expect("repair");
    }
    let response = regions
        .region1
        .put("items", "a", &json!({"id": "a", "later": true}))
        .await;
    assert_eq!(response.status(), 200);
    wait_published(&regions).await;
    let second = read_topic(&regions, &ends(&first)).await;
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &second)).await,
        no_failures()
    );
    assert_eq!(
        TwoRegions::snapshot(&regions.region2_pool).await,
        TwoRegions::snapshot(&regions.region1.pool).await
    );
    assert_eq!(
        item(&regions, "a").await,
        Some((2, Some(json!({"id": "a", "later": true}))))
    );
    assert_eq!(item(&regions, "x").await, None);
    assert_eq!(served_version(&regions, "/v1/items/a").await, Some(2));
    assert_eq!(served_version(&regions, "/v1/items/x").await, None);

    // Region 1's `a` reaches version 7, the version the repair replaced; delivering the
    // repair's batch again then changes nothing: a redelivered repair never uses its rule.
    for n in 3..=7 {
        let response = regions
            .region1
            .put("items", "a", &json!({"id": "a", "n": n}))
            .await;
        assert_eq!(response.status(), 200);
    }
    wait_published(&regions).await;
    let third = read_topic(&regions, &ends(&second)).await;
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &third)).await,
        no_failures()
    );
    assert_eq!(
        item(&regions, "a").await,
        Some((7, Some(json!({"id": "a", "n": 7}))))
    );
    let duplicates = outcome_count(&apply, "duplicate");
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &second)).await,
        no_failures()
    );
    assert!(outcome_count(&apply, "duplicate") > duplicates);
    assert_eq!(
        item(&regions, "a").await,
        Some((7, Some(json!({"id": "a", "n": 7})))),
        "a redelivered repair moved the document back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_newer_schema_is_reported_unapplied_with_its_partition_after_it() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    let apply = function(&regions, None).await;
    for i in 0..12 {
        let response = regions
            .region1
            .put("schema", &format!("s{i}"), &json!({"i": i}))
            .await;
        assert_eq!(response.status(), 201);
    }
    wait_published(&regions).await;
    let records = read_topic(&regions, &HashMap::new()).await;
    // The second change event of the partition holding most: its header names version 3, as
    // a relay upgraded before this function would write it.
    let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for record in records.iter().filter(|m| !is_heartbeat(m)) {
        per_partition
            .entry(record.partition())
            .or_default()
            .push(record.offset());
    }
    let (partition, offsets) = per_partition
        .iter()
        .max_by_key(|(_, offsets)| offsets.len())
        .expect("records");
    assert!(offsets.len() >= 2, "{per_partition:?}");
    let (partition, held_offset) = (*partition, offsets[1]);
    let mut event = msk_event(&regions, &records);
    let key = format!("{}-{partition}", regions.topic);
    for record in event["records"][&key].as_array_mut().expect("partition") {
        if record["offset"] == held_offset {
            let headers = record["headers"].as_array_mut().expect("headers");
            for header in headers.iter_mut() {
                if let Some(value) = header.get_mut("tandem-schema") {
                    *value = json!([b'3' as i8]);
                }
            }
        }
    }

    let answer = invoke(&apply, &event).await;
    let expected: Vec<Value> = records
        .iter()
        .filter(|m| m.partition() == partition && m.offset() >= held_offset)
        .map(|m| json!({"itemIdentifier": {"topic-partition": key, "offset": m.offset()}}))
        .collect();
    assert_eq!(
        answer,
        json!({ "batchItemFailures": expected }),
        "the partition is reported from the held record on"
    );
    assert_eq!(outcome_count(&apply, "held_back"), 1);
    assert_eq!(apply.applier().metrics.held_partitions.get(), 1);
    assert_eq!(
        count(&regions, "SELECT count(*) FROM dead_letters").await,
        0,
        "a newer event is never dead-lettered"
    );
    // Before the held record: applied; from it on: not; other partitions: applied.
    for record in records.iter().filter(|m| !is_heartbeat(m)) {
        let path = format!(
            "/v1/{}",
            String::from_utf8_lossy(record.key().expect("key"))
        );
        let held = record.partition() == partition && record.offset() >= held_offset;
        assert_eq!(
            served_version(&regions, &path).await.is_some(),
            !held,
            "{path} at {}:{}",
            record.partition(),
            record.offset()
        );
    }

    // An upgraded function reads the record (here: the same record as the relay wrote it).
    let retried: Vec<OwnedMessage> = records
        .iter()
        .filter(|m| m.partition() == partition && m.offset() >= held_offset)
        .cloned()
        .collect();
    assert_eq!(
        invoke(&apply, &msk_event(&regions, &retried)).await,
        no_failures()
    );
    assert_eq!(apply.applier().metrics.held_partitions.get(), 0);
    assert_eq!(
        TwoRegions::snapshot(&regions.region2_pool).await,
        TwoRegions::snapshot(&regions.region1.pool).await
    );
    assert_each_event_applied_once(&regions).await;
}

/// A shipped function binary served by the runtime API stand-in: `(events in, answers out,
/// the process)`.
fn start_function(
    name: &str,
    dir: &std::path::Path,
    api: &str,
    env: &[(&str, &str)],
) -> ManagedProcess {
    let env: Vec<(String, String)> = [
        ("AWS_LAMBDA_RUNTIME_API", api.trim_start_matches("http://")),
        ("AWS_LAMBDA_FUNCTION_NAME", name),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("TANDEM_LOG_FORMAT", "pretty"),
    ]
    .iter()
    .chain(env)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    ManagedProcess::start(
        name,
        &binary(name),
        &[],
        &env,
        &dir.join(format!("{name}.log")),
        "",
    )
    .unwrap_or_else(|e| panic!("start {name}: {e}"))
}

/// Waits (bounded) for the spans `wanted` (`(service, name)`) of `trace_id` to have arrived.
async fn spans_arrived(
    collector: &crate::traces::Collector,
    trace_id: &str,
    wanted: (&str, &str),
) -> bool {
    // The invocation's answer is posted after its spans were exported: they are there at once.
    // The second is for the collector's own bookkeeping, not an export interval (a minute).
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if collector
            .trace(trace_id)
            .iter()
            .any(|s| (s.service.as_str(), s.name.as_str()) == wanted)
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lambda_invocation_exports_its_spans_before_it_returns() {
    let collector = crate::traces::Collector::start().await;
    // A batch waits ten minutes for its export: only the flush at the end of an invocation
    // can send a span in time.
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    ];
    let mut regions = TwoRegions::start_without_workers().await;
    // The relay exports promptly, so the apply continues the write's trace through it.
    regions.start_relay_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let dir = scratch_dir("lambda-spans");
    let (events, queued) = mpsc::unbounded_channel();
    let (posted, mut answers) = mpsc::unbounded_channel();
    let api = serve(runtime_api(queued, posted)).await;

    // The Write API under the Lambda runtime, with the shipped ALB fixture and a traceparent.
    let write = start_function(
        "tandem-write",
        &dir,
        &api,
        &[
            &[
                ("TANDEM_REGION", "region1"),
                ("DATABASE_URL", regions.region1.database_url.as_str()),
                ("REDIS_URL", regions.region1.redis_url.as_str()),
                ("REDIS_KEY_PREFIX", regions.region1.cache_prefix.as_str()),
                (
                    "TANDEM_JWT_HS256_SECRET",
                    tandem_http::auth::DEV_HS256_SECRET,
                ),
                ("TANDEM_DEV_MODE", "true"),
            ][..],
            &otel[..],
        ]
        .concat(),
    );
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../functions/write/events/alb-put.json");
    let mut event: Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture).expect("the ALB fixture"))
            .expect("JSON");
    let trace_id = uuid::Uuid::now_v7().simple().to_string();
    event["headers"]["traceparent"] = json!(format!("00-{trace_id}-00f067aa0ba902b7-01"));
    events.send(event).expect("queue the event");
    let (what, body) = tokio::time::timeout(Duration::from_secs(60), answers.recv())
        .await
        .unwrap_or_else(|_| panic!("no answer within 60 s:\n{}", write.log_tail()))
        .expect("an answer");
    assert_eq!(
        (what.as_str(), &body["statusCode"]),
        ("response", &json!(201)),
        "{body}\n{}",
        write.log_tail()
    );
    assert!(
        spans_arrived(
            &collector,
            &trace_id,
            ("tandem-write", "PUT /v1/{collection}/{id}")
        )
        .await,
        "the Write function's request span was not exported before the invocation returned: {:#?}\n{}",
        collector.trace(&trace_id),
        write.log_tail()
    );
    drop(write);

    // Region 2's apply function, with the records the relay published for that write.
    wait_published(&regions).await;
    let records = read_topic(&regions, &HashMap::new()).await;
    let apply = start_function(
        "tandem-region2-apply-lambda",
        &dir,
        &api,
        &[
            &[
                ("TANDEM_REGION", "region2"),
                ("DATABASE_URL", regions.region2_database_url.as_str()),
                ("REDIS_URL", regions.region2_redis_url.as_str()),
                ("REDIS_KEY_PREFIX", regions.region2_key_prefix.as_str()),
                ("KAFKA_TOPIC", regions.topic.as_str()),
                ("KAFKA_TOPIC_PARTITIONS", "3"),
            ][..],
            &otel[..],
        ]
        .concat(),
    );
    events
        .send(self_managed_event(&regions, &records))
        .expect("queue the event");
    let (what, body) = tokio::time::timeout(Duration::from_secs(60), answers.recv())
        .await
        .unwrap_or_else(|_| panic!("no answer within 60 s:\n{}", apply.log_tail()))
        .expect("an answer");
    assert_eq!(
        (what.as_str(), &body),
        ("response", &no_failures()),
        "{}",
        apply.log_tail()
    );
    assert!(
        spans_arrived(
            &collector,
            &trace_id,
            ("tandem-region2-apply-lambda", "apply")
        )
        .await,
        "the apply function's span was not exported before the invocation returned: {:#?}\n{}",
        collector.trace(&trace_id),
        apply.log_tail()
    );
    drop(apply);
    let _ = std::fs::remove_dir_all(dir);
}
