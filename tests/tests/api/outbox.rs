use reqwest::Method;
use serde_json::{Value, json};
use tandem_tests::spawn_app;

#[tokio::test]
async fn every_accepted_write_commits_exactly_one_complete_outbox_row() {
    let app = spawn_app().await;
    let mut accepted = 0;
    for i in 0..10 {
        assert!(
            app.put("items", &format!("i{i}"), &json!({"i": i}))
                .await
                .status()
                .is_success()
        );
        accepted += 1;
    }
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let patched = app
        .write(Method::PATCH, "/v1/items/i0")
        .header("content-type", "application/merge-patch+json")
        .header("traceparent", traceparent)
        .body(r#"{"extra": true}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(patched.status(), 200);
    accepted += 1;
    assert_eq!(
        app.write(Method::DELETE, "/v1/items/i1")
            .send()
            .await
            .expect("send")
            .status(),
        204
    );
    accepted += 1;
    // Refused writes add nothing.
    assert_eq!(
        app.write(Method::DELETE, "/v1/items/i1")
            .send()
            .await
            .expect("send")
            .status(),
        404
    );
    assert_eq!(
        app.write(Method::PUT, "/v1/items/i2")
            .header("if-match", "\"9\"")
            .json(&json!({}))
            .send()
            .await
            .expect("send")
            .status(),
        412
    );

    assert_eq!(app.count("outbox").await, accepted);
    let client = app.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT event_id, collection, document_id, version, operation, payload, traceparent, created_at IS NOT NULL, published_at IS NULL \
             FROM outbox WHERE document_id = 'i0' AND version = 2",
            &[],
        )
        .await
        .expect("outbox row");
    let event_id: uuid::Uuid = row.get(0);
    assert_eq!(event_id.get_version_num(), 7);
    assert_eq!(row.get::<_, String>(1), "items");
    assert_eq!(row.get::<_, String>(4), "upsert");
    let payload: Value = row.get(5);
    assert_eq!(payload["data"], json!({"i": 0, "extra": true}));
    assert_eq!(payload["version"], 2);
    assert_eq!(row.get::<_, String>(6), traceparent);
    assert!(row.get::<_, bool>(7));
    assert!(row.get::<_, bool>(8));
    let tombstone: Value = client
        .query_one(
            "SELECT payload FROM outbox WHERE document_id = 'i1' AND operation = 'delete'",
            &[],
        )
        .await
        .expect("tombstone row")
        .get(0);
    assert_eq!(tombstone["deleted"], true);
    assert_eq!(tombstone["version"], 2);
    // Without a client traceparent, one is started.
    let generated: String = client
        .query_one(
            "SELECT traceparent FROM outbox WHERE document_id = 'i3'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert!(tandem_core::traceparent::TraceParent::parse(&generated).is_some());
}

#[tokio::test]
async fn a_write_that_fails_inside_the_transaction_leaves_neither_row_nor_event() {
    let app = spawn_app().await;
    app.put("ledger", "existing", &json!({"v": 1})).await;
    // Make the outbox insert fail for one collection, after the document row was written.
    let client = app.pool.get().await.expect("db");
    client
        .batch_execute(
            "CREATE FUNCTION fail_outbox() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.collection = 'ledger' THEN RAISE EXCEPTION 'forced failure'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION fail_outbox();",
        )
        .await
        .expect("install trigger");

    let created = app.put("ledger", "new", &json!({"v": 1})).await;
    assert_eq!(created.status(), 500);
    assert_eq!(
        created.headers()["content-type"],
        "application/problem+json"
    );
    let text = created.text().await.expect("body");
    assert!(
        !text.contains("forced failure") && !text.contains("outbox"),
        "leaks the cause: {text}"
    );
    let updated = app.put("ledger", "existing", &json!({"v": 2})).await;
    assert_eq!(updated.status(), 500);
    let idempotent = app
        .write(Method::POST, "/v1/ledger")
        .header("idempotency-key", "k1")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(idempotent.status(), 500);

    let docs: Vec<(String, i64)> = client
        .query(
            "SELECT id, version FROM documents WHERE collection = 'ledger' ORDER BY id",
            &[],
        )
        .await
        .expect("documents")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(docs, vec![("existing".to_owned(), 1)]);
    assert_eq!(app.count("outbox").await, 1);
    assert_eq!(app.count("idempotency_keys").await, 0);
    let read: Value = app
        .get("/v1/ledger/existing")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(read["version"], 1);

    // No connection went back to the pool inside the failed transactions: with the cause gone,
    // every connection of the pool (16) writes again.
    client
        .batch_execute("DROP TRIGGER fail_outbox ON outbox")
        .await
        .expect("drop trigger");
    for i in 0..40 {
        let response = app.put("ledger", "existing", &json!({"v": i})).await;
        assert_eq!(response.status(), 200, "write {i} after the failures");
    }
    assert_eq!(app.count("outbox").await, 41);
}

/// The sorted keys of a JSON object.
fn keys_of(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    keys
}

/// Writes without an `Idempotency-Key` build their outbox payload in SQL (pipelined path),
/// writes with one in Rust (step-by-step path): both must describe exactly what was
/// acknowledged, in the same shape.
#[tokio::test]
async fn both_write_paths_queue_the_acknowledged_state_in_the_same_shape() {
    let app = spawn_app().await;
    let payload = |id: &'static str, version: i64| {
        let app = &app;
        async move {
            let client = app.pool.get().await.expect("db");
            client
                .query_one(
                    "SELECT payload FROM outbox WHERE document_id = $1 AND version = $2",
                    &[&id, &version],
                )
                .await
                .expect("outbox row")
                .get::<_, Value>(0)
        }
    };
    let mut shapes = Vec::new();
    for (id, key) in [("plain", None), ("keyed", Some("k-1"))] {
        for (step, body) in [(1, json!({"n": 1, "s": "é\n"})), (2, json!({"n": 2.5}))] {
            let mut request = app
                .write(Method::PUT, &format!("/v1/paths/{id}"))
                .json(&body);
            if let Some(key) = key {
                request = request.header("idempotency-key", format!("{key}-{step}"));
            }
            let response = request.send().await.expect("send");
            assert!(response.status().is_success());
            let acknowledged: Value = response.json().await.expect("json");
            let queued = payload(id, step).await;
            let state: tandem_core::event::DocumentState =
                serde_json::from_value(queued.clone()).expect("a document state");
            assert_eq!(json!(state.version), acknowledged["version"]);
            // The same instants, written in UTC whatever the session's TimeZone.
            for field in ["created_at", "updated_at"] {
                let parse = |v: &Value| {
                    time::OffsetDateTime::parse(
                        v.as_str().expect("a time"),
                        &time::format_description::well_known::Rfc3339,
                    )
                    .expect("RFC 3339")
                };
                assert_eq!(
                    parse(&queued[field]),
                    parse(&acknowledged[field]),
                    "{field}"
                );
                assert!(
                    queued[field].as_str().is_some_and(|t| t.ends_with('Z')),
                    "{queued}"
                );
            }
            for field in ["collection", "id", "version", "data"] {
                assert_eq!(queued[field], acknowledged[field], "{field}");
            }
            shapes.push(keys_of(&queued));
        }
        let mut request = app.write(Method::DELETE, &format!("/v1/paths/{id}"));
        if let Some(key) = key {
            request = request.header("idempotency-key", format!("{key}-delete"));
        }
        assert_eq!(request.send().await.expect("send").status(), 204);
        let tombstone = payload(id, 3).await;
        assert_eq!(tombstone["deleted"], json!(true));
        assert_eq!(tombstone["version"], json!(3));
        shapes.push(keys_of(&tombstone));
    }
    assert_eq!(shapes[..3], shapes[3..]);
}
