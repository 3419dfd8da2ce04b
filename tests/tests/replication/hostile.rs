//! Hostile input cannot stop replication: whatever the Write API accepts reaches Region 2,
//! whatever it refuses is refused with a problem naming the limit, and rows or records that
//! cannot be published or applied are set aside with their reason while everything behind
//! them still flows.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::Method;
use serde_json::{Value, json};
use tandem_core::limits::{
    KAFKA_MAX_MESSAGE_BYTES, MAX_BODY_BYTES, MAX_DOCUMENT_BYTES, MAX_EVENT_BYTES, MAX_JSON_DEPTH,
};
use tandem_tests::TwoRegions;

use crate::support::{produce_raw, wait_published};

/// `{"a":{"a":…1…}}` with `depth` objects.
fn nested(depth: usize) -> String {
    let mut text = "1".to_owned();
    for _ in 0..depth {
        text = format!("{{\"a\":{text}}}");
    }
    text
}

/// A document whose JSON text, as PostgreSQL renders it, is exactly `bytes` long: `n` copies
/// of `1e300` (301 bytes each once PostgreSQL writes the number out) plus a padding string,
/// tuned against the database itself rather than a guess at its formatting.
async fn document_rendering_to(regions: &TwoRegions, bytes: usize) -> String {
    let client = regions.region1.pool.get().await.expect("db");
    let numbers = vec!["1e300"; 1500].join(",");
    let candidate = |pad: usize| format!("{{\"n\":[{numbers}],\"s\":\"{}\"}}", "x".repeat(pad));
    let rendered: i32 = client
        .query_one(
            "SELECT octet_length($1::text::jsonb::text)",
            &[&candidate(0)],
        )
        .await
        .expect("render")
        .get(0);
    let rendered = usize::try_from(rendered).expect("size");
    assert!(
        rendered < bytes,
        "1500 numbers already render to {rendered} bytes"
    );
    let document = candidate(bytes - rendered);
    let check: i32 = client
        .query_one("SELECT octet_length($1::text::jsonb::text)", &[&document])
        .await
        .expect("render")
        .get(0);
    assert_eq!(usize::try_from(check).expect("size"), bytes);
    document
}

struct Case {
    name: &'static str,
    /// The document written (default: one per case); the version an accepted write makes.
    id: Option<&'static str>,
    version: i64,
    method: Method,
    content_type: &'static str,
    body: String,
    /// The status expected, and for a refusal the problem type.
    status: u16,
    problem: Option<&'static str>,
}

fn case(name: &'static str, body: String, status: u16, problem: Option<&'static str>) -> Case {
    Case {
        name,
        id: None,
        version: 1,
        method: Method::PUT,
        content_type: "application/json",
        body,
        status,
        problem,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_write_is_refused_or_replicated_and_replication_goes_on() {
    let regions = TwoRegions::start().await;
    let at_document_limit = document_rendering_to(&regions, MAX_DOCUMENT_BYTES).await;
    let past_document_limit = document_rendering_to(&regions, MAX_DOCUMENT_BYTES + 1).await;
    // A body exactly at the request limit: `{"s":"xxx…"}`.
    let at_body_limit = format!("{{\"s\":\"{}\"}}", "x".repeat(MAX_BODY_BYTES - 8));
    assert_eq!(at_body_limit.len(), MAX_BODY_BYTES);
    let past_body_limit = format!("{{\"s\":\"{}\"}}", "x".repeat(MAX_BODY_BYTES - 7));
    let quarter = "y".repeat(200 * 1024);

    let mut cases = vec![
        case("depth at the limit", nested(MAX_JSON_DEPTH), 201, None),
        case(
            "depth past the limit",
            nested(MAX_JSON_DEPTH + 1),
            422,
            Some("too-deep"),
        ),
        case("the 128-level document", nested(128), 422, Some("too-deep")),
        case(
            "past the parser's own limit",
            nested(5000),
            422,
            Some("too-deep"),
        ),
        case("stored size at the limit", at_document_limit, 201, None),
        case(
            "stored size past the limit",
            past_document_limit,
            413,
            Some("document-too-large"),
        ),
        case(
            "expanding numbers",
            format!("{{\"n\":[{}]}}", vec!["1e300"; 2000].join(",")),
            413,
            Some("document-too-large"),
        ),
        case("body at the limit", at_body_limit, 201, None),
        case(
            "body past the limit",
            past_body_limit,
            413,
            Some("payload-too-large"),
        ),
        case(
            "a number out of range",
            r#"{"n":1e400}"#.to_owned(),
            400,
            Some("malformed-json"),
        ),
        case(
            "a 30-digit integer",
            r#"{"n":123456789012345678901234567890}"#.to_owned(),
            201,
            None,
        ),
        case(
            "negative zero",
            r#"{"n":-0,"m":-0.0}"#.to_owned(),
            201,
            None,
        ),
        case(
            "tiny and huge floats",
            r#"{"n":[1e-300,5e-324,1.7976931348623157e308,0.1]}"#.to_owned(),
            201,
            None,
        ),
        case(
            "control characters",
            json!({"c": "\u{1}\u{1f}\u{7f}\u{2028}"}).to_string(),
            201,
            None,
        ),
        case(
            "a NUL character",
            r#"{"c":"a\u0000b"}"#.to_owned(),
            422,
            Some("unstorable-value"),
        ),
        case(
            "a huge key",
            json!({ "k".repeat(200 * 1024): 1 }).to_string(),
            201,
            None,
        ),
    ];
    // Growth by PATCH: 200 KiB, then 200 KiB more (accepted), then 200 KiB more: that merge
    // passes the stored limit although each request is small.
    cases.push(Case {
        id: Some("grown"),
        ..case("200 KiB", json!({"a": quarter}).to_string(), 201, None)
    });
    let patch = |name, key: &str, status, problem, version| Case {
        name,
        id: Some("grown"),
        version,
        method: Method::PATCH,
        content_type: "application/merge-patch+json",
        body: json!({ key: quarter }).to_string(),
        status,
        problem,
    };
    cases.push(patch("grown by patch to 400 KiB", "b", 200, None, 2));
    cases.push(patch(
        "a patch that grows the document past the limit",
        "c",
        413,
        Some("document-too-large"),
        3,
    ));

    for (i, case) in cases.iter().enumerate() {
        let id = case.id.map_or_else(|| format!("case{i}"), str::to_owned);
        let response = regions
            .region1
            .write(case.method.clone(), &format!("/v1/hostile/{id}"))
            .header("content-type", case.content_type)
            .body(case.body.clone())
            .send()
            .await
            .expect("write sent");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, case.status, "{}: {text}", case.name);
        if let Some(problem) = case.problem {
            assert_eq!(content_type, "application/problem+json", "{}", case.name);
            let body: Value = serde_json::from_str(&text).expect("problem json");
            assert_eq!(
                body["type"],
                format!("/problems/{problem}"),
                "{}: {body}",
                case.name
            );
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(
                detail.chars().any(|c| c.is_ascii_digit()),
                "{}: the problem names the limit: {detail}",
                case.name
            );
        } else {
            // Accepted: Region 2 serves exactly what Region 1 serves.
            regions
                .wait_region2_version(
                    &format!("/v1/hostile/{id}"),
                    case.version,
                    Duration::from_secs(30),
                )
                .await;
            let one: Value = regions
                .region1
                .get(&format!("/v1/hostile/{id}"))
                .await
                .json()
                .await
                .expect("region1 json");
            let two: Value = regions
                .region2_get(&format!("/v1/hostile/{id}"))
                .await
                .json()
                .await
                .expect("region2 json");
            assert_eq!(one["data"], two["data"], "{}", case.name);
        }
        // Whatever happened, an ordinary write behind it still reaches Region 2.
        let canary = regions
            .region1
            .put("canary", &format!("after{i}"), &json!({"after": case.name}))
            .await;
        assert_eq!(canary.status(), 201, "{}", case.name);
        regions
            .wait_region2_version(&format!("/v1/canary/after{i}"), 1, Duration::from_secs(30))
            .await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;
    let client = regions.region2_pool.get().await.expect("db");
    let letters: i64 = client
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        letters, 0,
        "nothing the Write API accepted was dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_relay_cannot_publish_are_set_aside_and_the_next_write_still_converges() {
    let regions = TwoRegions::start().await;
    let client = regions.region1.pool.get().await.expect("db");
    // Rows written before the limits existed (or by another writer): one too large for Kafka,
    // one nested deeper than any parser on the way accepts.
    let too_large = json!({
        "collection": "legacy", "id": "big", "version": 1,
        "data": {"s": "z".repeat(MAX_EVENT_BYTES)},
        "created_at": "2026-11-01T00:00:00Z", "updated_at": "2026-11-01T00:00:00Z",
    })
    .to_string();
    let too_deep = format!(
        r#"{{"collection":"legacy","id":"deep","version":1,"data":{},"created_at":"2026-11-01T00:00:00Z","updated_at":"2026-11-01T00:00:00Z"}}"#,
        nested(200)
    );
    for (id, payload) in [("big", &too_large), ("deep", &too_deep)] {
        client
            .execute(
                "INSERT INTO outbox (event_id, collection, document_id, version, operation, payload) \
                 VALUES ($1, 'legacy', $2, 1, 'upsert', $3::text::jsonb)",
                &[&uuid::Uuid::now_v7(), &id, payload],
            )
            .await
            .expect("insert legacy outbox row");
    }
    // The next writes of both documents are ordinary ones: replication is state-based, so they
    // bring Region 2 up to date.
    for id in ["big", "deep"] {
        let response = regions
            .region1
            .put("legacy", id, &json!({"now": "fine"}))
            .await;
        assert!(response.status().is_success());
    }
    regions.wait_converged(Duration::from_secs(30)).await;

    let moved: Vec<(String, String)> = client
        .query(
            "SELECT document_id, reason FROM relay_dead_letters ORDER BY document_id",
            &[],
        )
        .await
        .expect("relay dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].0, "big");
    assert!(
        moved[0].1.contains(&MAX_EVENT_BYTES.to_string()),
        "{moved:?}"
    );
    let unpublished: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(unpublished, 0);
    let counted = regions
        .metric(regions.relay_ports[0], "tandem_relay_dead_lettered_total")
        .await;
    assert_eq!(counted, Some(1.0));
    // The deep row was published as it was stored (the relay never parses payloads); Region 2
    // could not decode it and dead-lettered it, with the reason.
    let two = regions.region2_pool.get().await.expect("db");
    let reasons: Vec<String> = two
        .query("SELECT reason FROM dead_letters", &[])
        .await
        .expect("dead letters")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("recursion limit"), "{reasons:?}");
}

/// Waits (bounded, generously) until Region 1 holds `count` relay dead letters.
async fn wait_relay_dead_letters(regions: &TwoRegions, count: i64) {
    let client = regions.region1.pool.get().await.expect("db");
    for _ in 0..600 {
        let moved: i64 = client
            .query_one("SELECT count(*) FROM relay_dead_letters", &[])
            .await
            .expect("count")
            .get(0);
        if moved >= count {
            assert_eq!(moved, count);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the relay did not set {count} rows aside within 60 s:\n{}",
        regions.relays[0].log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_unreadable_or_refused_by_the_client_or_the_broker_are_set_aside() {
    // The topic's own limit, below the producer's: an event between the two is sent by the
    // client and refused by the broker.
    const TOPIC_MAX_MESSAGE_BYTES: usize = 64 * 1024;
    let mut regions = TwoRegions::start_without_workers().await;
    // The topic exists before the relay starts, which keeps it as it is.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .create()
        .expect("admin");
    let limit = TOPIC_MAX_MESSAGE_BYTES.to_string();
    let replication = i32::try_from(regions.broker.replication()).expect("replication");
    // One partition: every record travels in the same produce requests.
    let topic = NewTopic::new(&regions.topic, 1, TopicReplication::Fixed(replication))
        .set("max.message.bytes", &limit);
    let created = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create topics");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    regions.start_relay();
    regions.start_consumer();
    regions.wait_region2_ready(Duration::from_secs(60)).await;

    // Rows written by hand, as no Write API would: one under a collection name the relay
    // cannot read, one whose trace context makes its message larger than the producer's
    // message.max.bytes (the Kafka client refuses it).
    let client = regions.region1.pool.get().await.expect("db");
    let state = |collection: &str, id: &str| {
        json!({"collection": collection, "id": id, "version": 1, "data": {"by": "hand"},
            "created_at": "2026-11-01T00:00:00Z", "updated_at": "2026-11-01T00:00:00Z"})
        .to_string()
    };
    let huge_trace = "0".repeat(KAFKA_MAX_MESSAGE_BYTES + 1);
    for (collection, id, traceparent) in [
        ("Not A Collection!", "unreadable", None),
        ("legacy", "traced", Some(huge_trace.as_str())),
    ] {
        client
            .execute(
                "INSERT INTO outbox (event_id, collection, document_id, version, operation, \
                 payload, traceparent) VALUES ($1, $2, $3, 1, 'upsert', $4::text::jsonb, $5)",
                &[
                    &uuid::Uuid::now_v7(),
                    &collection,
                    &id,
                    &state(collection, id),
                    &traceparent,
                ],
            )
            .await
            .expect("insert an outbox row by hand");
    }
    // A document the Write API accepts, whose event the broker refuses as larger than the
    // topic allows (random base64: compression cannot shrink it under the limit), with
    // ordinary writes around it. The relay is held meanwhile, so they make one batch: the
    // broker refuses every record of the produce request the wide one travels in.
    regions.relays[0].signal("STOP");
    let random: Vec<u8> = (0..2 * TOPIC_MAX_MESSAGE_BYTES)
        .map(|_| rand::random::<u8>())
        .collect();
    regions
        .region1
        .put("neighbour", "before", &json!({"n": 1}))
        .await;
    let response = regions
        .region1
        .put("wide", "doc", &json!({ "s": BASE64.encode(random) }))
        .await;
    assert_eq!(response.status(), 201);
    for n in 0..5 {
        regions
            .region1
            .put("neighbour", &format!("after-{n}"), &json!({"n": n}))
            .await;
    }
    regions.relays[0].signal("CONT");
    wait_relay_dead_letters(&regions, 3).await;
    // Only the wide one is set aside: its neighbours, refused with it, were sent again alone.
    regions
        .wait_region2_version("/v1/neighbour/before", 1, Duration::from_secs(60))
        .await;
    for n in 0..5 {
        regions
            .wait_region2_version(
                &format!("/v1/neighbour/after-{n}"),
                1,
                Duration::from_secs(60),
            )
            .await;
    }

    // Ordinary writes behind them flow, and the documents' next writes converge Region 2.
    for (collection, id) in [("legacy", "traced"), ("wide", "doc"), ("canary", "after")] {
        let response = regions
            .region1
            .put(collection, id, &json!({"now": "fine"}))
            .await;
        assert!(response.status().is_success(), "{collection}/{id}");
    }
    regions
        .wait_region2_version("/v1/canary/after", 1, Duration::from_secs(60))
        .await;
    regions
        .wait_region2_version("/v1/wide/doc", 2, Duration::from_secs(60))
        .await;
    regions.wait_converged(Duration::from_secs(60)).await;

    let moved: Vec<(String, String, String)> = client
        .query(
            "SELECT collection, document_id, reason FROM relay_dead_letters ORDER BY seq",
            &[],
        )
        .await
        .expect("relay dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected = [
        ("unreadable", "undecodable outbox row"),
        ("traced", "refused by the Kafka client"),
        ("doc", "refused by the broker"),
    ];
    assert_eq!(moved.len(), expected.len(), "{moved:?}");
    for ((_, id, reason), (expected_id, expected_reason)) in moved.iter().zip(expected) {
        assert_eq!(id, expected_id, "{moved:?}");
        assert!(reason.starts_with(expected_reason), "{id}: {reason}");
    }
    assert_eq!(
        regions
            .metric(regions.relay_ports[0], "tandem_relay_dead_lettered_total")
            .await,
        Some(3.0)
    );
    let unpublished: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(unpublished, 0);
    let two = regions.region2_pool.get().await.expect("db");
    let letters: i64 = two
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(letters, 0, "nothing unpublishable reached Region 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_producers_garbage_is_dead_lettered_byte_for_byte() {
    let regions = TwoRegions::start().await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .create()
        .expect("producer");
    let key: &[u8] = b"\x00\xff\xfe/\x00";
    let payload: &[u8] = b"\x00\x00garbage\xff\xc3\x28";
    let huge_header = vec![0u8; 200 * 1024];
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "ce_id",
            value: Some(&b"\x00\xff"[..]),
        })
        .insert(Header {
            key: "x-null",
            value: None::<&[u8]>,
        })
        .insert(Header {
            key: "x-huge",
            value: Some(huge_header.as_slice()),
        });
    producer
        .send(
            FutureRecord::to(&regions.topic)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .expect("produce garbage");
    // Decodes, but PostgreSQL cannot store it (a NUL character in a string): it fails to
    // apply, five times, and is then dead-lettered by itself.
    let unstorable = tandem_core::event::ChangeEvent::new(
        uuid::Uuid::now_v7(),
        &tandem_core::event::Origin::new("elsewhere", 1, 1),
        time::OffsetDateTime::now_utc(),
        serde_json::from_value(json!({"collection": "foreign", "id": "nul", "version": 1,
            "data": {"s": "a\u{0}b"}, "updated_at": "2026-11-25T09:00:00Z"}))
        .expect("state"),
    );
    producer
        .send(
            FutureRecord::to(&regions.topic)
                .key("foreign/nul")
                .payload(&unstorable.encode()),
            Duration::from_secs(5),
        )
        .await
        .expect("produce unstorable");
    let response = regions
        .region1
        .put("foreign", "after", &json!({"still": "flows"}))
        .await;
    assert_eq!(response.status(), 201);
    regions
        .wait_region2_version("/v1/foreign/after", 1, Duration::from_secs(60))
        .await;

    // The unstorable event is dead-lettered after its five attempts, which may end after the
    // write in another partition was applied.
    let client = regions.region2_pool.get().await.expect("db");
    for _ in 0..300 {
        let letters: i64 = client
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .expect("count")
            .get(0);
        if letters >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = client
        .query(
            "SELECT message_key, payload, header_names, header_values, reason \
             FROM dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("dead letters");
    assert_eq!(rows.len(), 2, "both records were dead-lettered");
    let stored_key: Option<Vec<u8>> = rows[0].get(0);
    let stored_payload: Option<Vec<u8>> = rows[0].get(1);
    let names: Vec<Option<String>> = rows[0].get(2);
    let values: Vec<Option<Vec<u8>>> = rows[0].get(3);
    assert_eq!(stored_key.as_deref(), Some(key));
    assert_eq!(stored_payload.as_deref(), Some(payload));
    assert_eq!(
        names,
        vec![
            Some("ce_id".to_owned()),
            Some("x-null".to_owned()),
            Some("x-huge".to_owned())
        ]
    );
    assert_eq!(
        values,
        vec![Some(b"\x00\xff".to_vec()), None, Some(huge_header)]
    );
    let reason: String = rows[0].get(4);
    assert!(reason.starts_with("undecodable event"), "{reason}");
    let reason: String = rows[1].get(4);
    assert!(reason.contains("could not be applied"), "{reason}");
    let absent = regions.region2_get("/v1/foreign/nul").await;
    assert_eq!(absent.status(), 404);

    // `redrive --id` without a number is an error, not "redrive everything".
    let output = regions.redrive_with(&["--id"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--id needs a number"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A redrive goes through every letter, each with its own result.
    let output = regions.redrive();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Option<String>> = client
        .query("SELECT redrive_result FROM dead_letters ORDER BY id", &[])
        .await
        .expect("results")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| r.as_deref().is_some_and(|r| r.starts_with("still poison"))),
        "{results:?}"
    );
}

/// `tandem_consumer_dead_letter_failures_total` of the first consumer (0 before it is reported).
async fn dead_letter_failures(regions: &TwoRegions) -> f64 {
    regions
        .metric(
            regions.consumer_ports[0],
            "tandem_consumer_dead_letter_failures_total",
        )
        .await
        .unwrap_or(0.0)
}

/// Waits (bounded, generously) until the consumer has failed to write a dead letter at least
/// `at_least` times.
async fn wait_dead_letter_failures(regions: &TwoRegions, at_least: f64) -> f64 {
    for _ in 0..1200 {
        let failures = dead_letter_failures(regions).await;
        if failures >= at_least {
            return failures;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the consumer did not report {at_least} failed dead letters within 120 s:\n{}",
        regions.consumers[0].log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_written_holds_the_position_until_it_can() {
    let regions = TwoRegions::start().await;
    let client = regions.region2_pool.get().await.expect("db");
    // Region 2 refuses every dead letter, for a reason retrying does not fix (an error raised
    // by a trigger, SQLSTATE P0001).
    client
        .batch_execute(
            "CREATE FUNCTION refuse_dead_letters() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'dead letters refused by the test'; END $$; \
             CREATE TRIGGER refuse_dead_letters BEFORE INSERT ON dead_letters \
             FOR EACH ROW EXECUTE FUNCTION refuse_dead_letters()",
        )
        .await
        .expect("refuse dead letters");
    let (partition, offset) = produce_raw(&regions, "poison/held", b"\x00 not an event \xff").await;
    wait_dead_letter_failures(&regions, 1.0).await;

    // An ordinary write behind the poison record: published, then held while the poison
    // record can be neither applied nor set aside, however long that lasts.
    let response = regions
        .region1
        .put("held", "after", &json!({"waits": "its turn"}))
        .await;
    assert_eq!(response.status(), 201);
    wait_published(&regions).await;
    let before = dead_letter_failures(&regions).await;
    wait_dead_letter_failures(&regions, before + 2.0).await;
    assert_eq!(
        regions.region2_get("/v1/held/after").await.status(),
        404,
        "nothing behind the poison record is applied past it"
    );
    let stored: Option<i64> = client
        .query_opt(
            "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = $2",
            &[&regions.topic, &partition],
        )
        .await
        .expect("position")
        .map(|row| row.get(0));
    assert!(
        stored.is_none_or(|next| next <= offset),
        "the position stays before the poison record ({stored:?}, record at {offset})"
    );
    let letters: i64 = client
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(letters, 0);
    // Not silent: the held partition stops the heartbeats too, and Region 2 reports the lag.
    regions
        .wait_region2_readiness(false, Duration::from_secs(60))
        .await;

    // The obstacle gone, the poison record is set aside and everything behind it applied.
    client
        .batch_execute("DROP TRIGGER refuse_dead_letters ON dead_letters")
        .await
        .expect("accept dead letters");
    regions
        .wait_region2_version("/v1/held/after", 1, Duration::from_secs(60))
        .await;
    let rows = client
        .query(
            "SELECT partition, \"offset\", payload, reason FROM dead_letters",
            &[],
        )
        .await
        .expect("dead letters");
    assert_eq!(rows.len(), 1, "the poison record, once");
    assert_eq!(rows[0].get::<_, i32>(0), partition);
    assert_eq!(rows[0].get::<_, i64>(1), offset);
    assert_eq!(
        rows[0].get::<_, Vec<u8>>(2),
        b"\x00 not an event \xff".to_vec()
    );
    let reason: String = rows[0].get(3);
    assert!(reason.starts_with("undecodable event"), "{reason}");
    regions.wait_converged(Duration::from_secs(30)).await;
    regions
        .wait_region2_readiness(true, Duration::from_secs(60))
        .await;
    assert_eq!(
        regions
            .metric(
                regions.consumer_ports[0],
                "tandem_consumer_events_total{outcome=\"dead_lettered\"}",
            )
            .await,
        Some(1.0)
    );
}

/// Waits (bounded, generously) until Region 2 holds `count` dead letters.
async fn wait_dead_letters(regions: &TwoRegions, count: i64) {
    let client = regions.region2_pool.get().await.expect("db");
    for _ in 0..600 {
        let letters: i64 = client
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .expect("count")
            .get(0);
        if letters >= count {
            assert_eq!(letters, count);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "Region 2 did not reach {count} dead letters within 60 s:\n{}",
        regions.consumers[0].log_tail()
    );
}

/// A log without its terminal colour codes (`ESC [ … m`).
fn without_colours(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_goes_through_every_letter_when_one_still_fails() {
    let regions = TwoRegions::start().await;
    let client = regions.region2_pool.get().await.expect("db");
    // Region 2 refuses the documents named in `refused` (an error raised by a trigger, which
    // retrying does not fix): their events are dead-lettered after their five attempts.
    client
        .batch_execute(
            "CREATE TABLE refused (id text PRIMARY KEY); \
             INSERT INTO refused VALUES ('stuck'), ('first'), ('second'); \
             CREATE FUNCTION refuse_documents() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF EXISTS (SELECT 1 FROM refused WHERE id = NEW.id) THEN \
                 RAISE EXCEPTION 'document % refused by the test', NEW.id; \
               END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER refuse_documents BEFORE INSERT OR UPDATE ON documents \
             FOR EACH ROW EXECUTE FUNCTION refuse_documents()",
        )
        .await
        .expect("refuse documents");
    // One at a time, so the letters come in this order: the one that will still fail first.
    for (n, id) in (1..).zip(["stuck", "first", "second"]) {
        let response = regions.region1.put("redrive", id, &json!({"id": id})).await;
        assert_eq!(response.status(), 201);
        wait_dead_letters(&regions, n).await;
    }
    let keys: Vec<Vec<u8>> = client
        .query("SELECT message_key FROM dead_letters ORDER BY id", &[])
        .await
        .expect("letters")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        keys,
        [&b"redrive/stuck"[..], b"redrive/first", b"redrive/second"]
    );

    // Two can be applied now; the first letter still cannot.
    client
        .execute("DELETE FROM refused WHERE id <> 'stuck'", &[])
        .await
        .expect("accept two");
    let output = regions.redrive();
    let report = without_colours(&String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{report}");
    let results: Vec<(i64, Option<String>, bool)> = client
        .query(
            "SELECT id, redrive_result, redriven_at IS NOT NULL FROM dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("results")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let (stuck, stuck_result, stuck_done) = &results[0];
    let stuck_result = stuck_result.as_deref().unwrap_or_default();
    assert!(
        stuck_result.starts_with("still poison: could not be applied")
            && stuck_result.contains("document stuck refused by the test"),
        "{stuck_result}"
    );
    assert!(!stuck_done, "a letter that still fails stays pending");
    for (id, result, done) in &results[1..] {
        assert_eq!(result.as_deref(), Some("applied"), "letter {id}");
        assert!(done, "letter {id} is redriven");
    }
    // The command's report names every letter with its result.
    for (id, result, _) in &results {
        let result = result.as_deref().unwrap_or_default();
        let line = report
            .lines()
            .find(|line| {
                line.contains("dead letter redriven") && line.contains(&format!("id={id} "))
            })
            .unwrap_or_else(|| panic!("no report for letter {id}:\n{report}"));
        let shown = result.split(':').next().unwrap_or_default();
        assert!(line.contains(shown), "letter {id}: {line}");
    }
    for (id, status) in [("first", 200), ("second", 200), ("stuck", 404)] {
        let response = regions.region2_get(&format!("/v1/redrive/{id}")).await;
        assert_eq!(response.status(), status, "{id}");
    }

    // Once nothing refuses it, a redrive of that letter alone applies it too.
    client
        .execute("DELETE FROM refused", &[])
        .await
        .expect("accept all");
    let output = regions.redrive_with(&["--id", &stuck.to_string()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pending: i64 = client
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE redriven_at IS NULL",
            &[],
        )
        .await
        .expect("pending")
        .get(0);
    assert_eq!(pending, 0);
    regions.wait_converged(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_that_times_out_in_region2_is_retried_never_dead_lettered() {
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay();
    regions.start_consumer_with(&[("DATABASE_LOCK_TIMEOUT_MS", "200")]);
    regions.wait_region2_ready(Duration::from_secs(60)).await;

    // Hold the documents table for three seconds: every apply meets lock_timeout (55P03).
    let mut holder = tokio_postgres::connect(&regions.region2_database_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(holder.1);
    let tx = holder.0.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let response = regions
        .region1
        .put("locked", "doc", &json!({"waits": true}))
        .await;
    assert_eq!(response.status(), 201);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.rollback().await.expect("release");

    regions
        .wait_region2_version("/v1/locked/doc", 1, Duration::from_secs(30))
        .await;
    let client = regions.region2_pool.get().await.expect("db");
    let letters: i64 = client
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        letters, 0,
        "a transient error never dead-letters a valid event"
    );
    // And the apply did meet lock_timeout (not merely wait out the lock): retried, not stuck.
    let log = std::fs::read_to_string(&regions.consumers[0].log).expect("consumer log");
    assert!(
        log.lines()
            .any(|line| line.contains("retrying") && line.contains("lock timeout")),
        "no lock_timeout retry in the consumer's log:\n{}",
        regions.consumers[0].log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_consumer_batches_stay_within_their_byte_budgets() {
    const BUDGET: usize = 700 * 1024;
    let mut regions = TwoRegions::start_without_workers().await;
    let budget = BUDGET.to_string();
    regions.start_relay_with(&[("RELAY_BATCH_BYTES", &budget)]);
    // A backlog of large documents waiting in Kafka for the consumer.
    let big = "b".repeat(200 * 1024);
    for i in 0..12 {
        let response = regions
            .region1
            .put("budget", &format!("d{i}"), &json!({"s": big}))
            .await;
        assert_eq!(response.status(), 201);
    }
    wait_published(&regions).await;
    regions.start_consumer_with(&[("CONSUMER_BATCH_BYTES", &budget)]);
    regions.wait_converged(Duration::from_secs(60)).await;

    let relay = regions
        .metric(regions.relay_ports[0], "tandem_relay_largest_batch_bytes")
        .await
        .expect("relay metric");
    assert!(
        relay > 0.0 && relay <= BUDGET as f64,
        "relay batch of {relay} bytes"
    );
    let consumer = regions
        .metric(
            regions.consumer_ports[0],
            "tandem_consumer_largest_batch_bytes",
        )
        .await
        .expect("consumer metric");
    // The consumer stops adding once the budget is reached: at most one message past it.
    assert!(
        consumer > 0.0 && consumer < (BUDGET + MAX_EVENT_BYTES) as f64,
        "consumer batch of {consumer} bytes"
    );
    assert!(
        consumer > 2.0 * 200.0 * 1024.0,
        "a backlog is applied in batches of several documents ({consumer} bytes)"
    );
}
