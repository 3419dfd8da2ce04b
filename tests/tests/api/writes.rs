use reqwest::Method;
use serde_json::{Value, json};
use tandem_core::consistency::ConsistencyToken;
use tandem_tests::spawn_app;

#[tokio::test]
async fn put_creates_then_replaces_with_growing_versions() {
    let app = spawn_app().await;
    let created = app.put("orders", "o-1", &json!({"total": 10})).await;
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["location"], "/v1/orders/o-1");
    assert_eq!(created.headers()["etag"], "\"1\"");
    assert_eq!(created.headers()["x-tandem-region"], "region1");
    let token = created.headers()["x-consistency-token"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let body: Value = created.json().await.expect("json");
    assert_eq!(body["collection"], "orders");
    assert_eq!(body["id"], "o-1");
    assert_eq!(body["version"], 1);
    assert_eq!(body["data"], json!({"total": 10}));
    assert!(
        time::OffsetDateTime::parse(
            body["created_at"].as_str().expect("str"),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok()
    );
    let decoded = ConsistencyToken::decode(&token).expect("token decodes");
    assert_eq!(
        (
            decoded.key.collection.as_str(),
            decoded.key.id.as_str(),
            decoded.version
        ),
        ("orders", "o-1", 1)
    );

    let replaced = app.put("orders", "o-1", &json!({"total": 11})).await;
    assert_eq!(replaced.status(), 200);
    assert!(replaced.headers().get("location").is_none());
    assert_eq!(replaced.headers()["etag"], "\"2\"");
    let body: Value = replaced.json().await.expect("json");
    assert_eq!(body["version"], 2);
    assert_eq!(body["data"]["total"], 11);
}

#[tokio::test]
async fn if_match_and_if_none_match_guard_writes() {
    let app = spawn_app().await;
    let create_only = |version: Option<&str>| {
        let mut request = app.write(Method::PUT, "/v1/c/x").json(&json!({"v": 1}));
        if let Some(v) = version {
            request = request.header("if-match", v);
        }
        request
    };
    // If-Match on an absent document fails.
    assert_eq!(
        create_only(Some("\"1\""))
            .send()
            .await
            .expect("send")
            .status(),
        412
    );
    // If-None-Match: * creates once, then refuses.
    let first = app
        .write(Method::PUT, "/v1/c/x")
        .header("if-none-match", "*")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(first.status(), 201);
    let second = app
        .write(Method::PUT, "/v1/c/x")
        .header("if-none-match", "*")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(second.status(), 412);
    assert_eq!(second.headers()["content-type"], "application/problem+json");
    let problem: Value = second.json().await.expect("json");
    assert_eq!(problem["current_version"], 1);
    // Matching If-Match succeeds; a stale one fails.
    assert_eq!(
        create_only(Some("\"1\""))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    assert_eq!(
        create_only(Some("\"1\""))
            .send()
            .await
            .expect("send")
            .status(),
        412
    );
    assert_eq!(
        create_only(Some("*")).send().await.expect("send").status(),
        200
    );
}

#[tokio::test]
async fn post_creates_with_a_server_generated_uuid_v7() {
    let app = spawn_app().await;
    let response = app
        .write(Method::POST, "/v1/events")
        .json(&json!({"kind": "click"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let body: Value = response.json().await.expect("json");
    let id = body["id"].as_str().expect("id");
    assert_eq!(location, format!("/v1/events/{id}"));
    let uuid = uuid::Uuid::parse_str(id).expect("uuid");
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(app.get(&location).await.status(), 200);
}

#[tokio::test]
async fn patch_merges_per_rfc_7396_and_needs_an_existing_document() {
    let app = spawn_app().await;
    app.put(
        "profiles",
        "p",
        &json!({"name": "Ada", "address": {"city": "London", "zip": "N1"}, "tags": ["a"]}),
    )
    .await;
    let patched = app
        .write(Method::PATCH, "/v1/profiles/p")
        .header("content-type", "application/merge-patch+json")
        .header("if-match", "\"1\"")
        .body(r#"{"address": {"zip": null, "country": "UK"}, "tags": ["b"], "age": 36}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(patched.status(), 200);
    let body: Value = patched.json().await.expect("json");
    assert_eq!(body["version"], 2);
    assert_eq!(
        body["data"],
        json!({"name": "Ada", "address": {"city": "London", "country": "UK"}, "tags": ["b"], "age": 36})
    );

    let absent = app
        .write(Method::PATCH, "/v1/profiles/nobody")
        .header("content-type", "application/merge-patch+json")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(absent.status(), 404);
    let stale = app
        .write(Method::PATCH, "/v1/profiles/p")
        .header("content-type", "application/merge-patch+json")
        .header("if-match", "\"1\"")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(stale.status(), 412);
}

#[tokio::test]
async fn delete_leaves_a_tombstone_and_a_later_put_continues_the_version() {
    let app = spawn_app().await;
    app.put("notes", "n", &json!({"text": "hi"})).await;
    let stale = app
        .write(Method::DELETE, "/v1/notes/n")
        .header("if-match", "\"7\"")
        .send()
        .await
        .expect("send");
    assert_eq!(stale.status(), 412);
    let deleted = app
        .write(Method::DELETE, "/v1/notes/n")
        .header("if-match", "\"1\"")
        .send()
        .await
        .expect("send");
    assert_eq!(deleted.status(), 204);
    assert_eq!(deleted.headers()["etag"], "\"2\"");
    assert!(deleted.headers().contains_key("x-consistency-token"));
    assert_eq!(app.get("/v1/notes/n").await.status(), 404);
    assert_eq!(
        app.write(Method::DELETE, "/v1/notes/n")
            .send()
            .await
            .expect("send")
            .status(),
        404
    );
    let patch = app
        .write(Method::PATCH, "/v1/notes/n")
        .header("content-type", "application/merge-patch+json")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(patch.status(), 404);

    let recreated = app.put("notes", "n", &json!({"text": "again"})).await;
    assert_eq!(recreated.status(), 201);
    assert_eq!(recreated.headers()["etag"], "\"3\"");
    let read: Value = app.get("/v1/notes/n").await.json().await.expect("json");
    assert_eq!(read["version"], 3);
    assert_eq!(read["data"]["text"], "again");

    // The tombstone itself was replicated as an event.
    let client = app.pool.get().await.expect("db");
    let ops: Vec<(i64, String)> = client
        .query(
            "SELECT version, operation FROM outbox WHERE document_id = 'n' ORDER BY seq",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        ops,
        vec![
            (1, "upsert".into()),
            (2, "delete".into()),
            (3, "upsert".into())
        ]
    );
}

#[tokio::test]
async fn idempotency_key_replays_the_original_response_and_writes_once() {
    let app = spawn_app().await;
    let post = |body: Value| {
        app.write(Method::POST, "/v1/payments")
            .header("idempotency-key", "pay-123")
            .json(&body)
            .send()
    };
    let first = post(json!({"amount": 5, "currency": "EUR"}))
        .await
        .expect("send");
    assert_eq!(first.status(), 201);
    let first_location = first.headers()["location"].clone();
    let first_body: Value = first.json().await.expect("json");

    // Same body (keys in another order, other whitespace): the same response, nothing written.
    let retry = app
        .write(Method::POST, "/v1/payments")
        .header("idempotency-key", "pay-123")
        .header("content-type", "application/json")
        .body(r#"{ "currency": "EUR", "amount": 5 }"#)
        .send()
        .await
        .expect("send");
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["location"], first_location);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry_body: Value = retry.json().await.expect("json");
    assert_eq!(retry_body, first_body);
    assert_eq!(app.count("documents").await, 1);
    assert_eq!(app.count("outbox").await, 1);

    let conflict = post(json!({"amount": 6, "currency": "EUR"}))
        .await
        .expect("send");
    assert_eq!(conflict.status(), 422);
    assert_eq!(
        conflict.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(app.count("outbox").await, 1);

    // Keys belong to the principal that used them.
    let other = app
        .client
        .post(format!("{}/v1/payments", app.write_url))
        .bearer_auth(
            tandem_http::auth::mint_hs256(
                &app.secret,
                "someone-else",
                &["tandem:write"],
                std::time::Duration::from_secs(60),
                None,
            )
            .expect("token"),
        )
        .header("idempotency-key", "pay-123")
        .json(&json!({"amount": 6}))
        .send()
        .await
        .expect("send");
    assert_eq!(other.status(), 201);
    assert_eq!(app.count("outbox").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_with_one_idempotency_key_write_once() {
    let app = spawn_app().await;
    let requests = (0..20).map(|_| {
        app.write(Method::POST, "/v1/orders")
            .header("idempotency-key", "same-key")
            .json(&json!({"item": "book"}))
            .send()
    });
    let responses = futures_util::future::join_all(requests).await;
    let mut ids = std::collections::HashSet::new();
    for response in responses {
        let response = response.expect("send");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("json");
        ids.insert(body["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(ids.len(), 1, "every retry must see the same document");
    assert_eq!(app.count("documents").await, 1);
    assert_eq!(app.count("outbox").await, 1);
}

#[tokio::test]
async fn extreme_numbers_round_trip_through_postgres() {
    let app = spawn_app().await;
    let data = json!({"max": f64::MAX, "min": -f64::MAX, "tiny": 5e-324, "big": u64::MAX, "neg": i64::MIN});
    let created = app.put("numbers", "n", &data).await;
    assert_eq!(created.status(), 201);
    // Read back from PostgreSQL (not the cache): a fresh replace proves the row is readable.
    assert_eq!(app.put("numbers", "n", &data).await.status(), 200);
    let listed: Value = app.get("/v1/numbers").await.json().await.expect("json");
    assert_eq!(listed["items"][0]["data"], data);
    assert_eq!(
        app.write(Method::DELETE, "/v1/numbers/n")
            .send()
            .await
            .expect("send")
            .status(),
        204
    );
}
