//! Every resource is bounded: time (lock and request timeouts, a readiness probe that never
//! queues), bytes (list pages), labels (unknown methods), and the database states that retrying
//! fixes answer 503, never 500.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tandem_core::limits::{LAMBDA_MAX_RESPONSE_BYTES, LIST_PAGE_BYTES};
use tandem_store::db::{DatabaseSettings, SessionLimits};
use tandem_tests::{TestAppOptions, spawn_app, spawn_app_with};

/// Holds a document's row lock (`FOR UPDATE`) in an open transaction until `ROLLBACK`.
async fn lock_row(url: &str, collection: &str, id: &str) -> tokio_postgres::Client {
    let (holder, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    holder.batch_execute("BEGIN").await.expect("begin");
    holder
        .execute(
            "SELECT 1 FROM documents WHERE collection = $1 AND id = $2 FOR UPDATE",
            &[&collection, &id],
        )
        .await
        .expect("lock the row");
    holder
}

/// Ends every other session on the app's database, so the pools reconnect with new settings.
async fn reconnect_everyone(client: &tokio_postgres::Client) {
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate sessions");
}

#[tokio::test]
async fn a_read_only_database_answers_503_and_writes_resume_afterwards() {
    let app = spawn_app().await;
    assert_eq!(app.put("ro", "a", &json!({"n": 1})).await.status(), 201);
    let (admin, connection) = tokio_postgres::connect(&app.database_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let database: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .expect("name")
        .get(0);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{database}\" SET default_transaction_read_only = on"
        ))
        .await
        .expect("read-only");
    reconnect_everyone(&admin).await;
    // The first request may meet a connection the termination closed: also a 503.
    for _ in 0..3 {
        let response = app.put("ro", "a", &json!({"n": 2})).await;
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["type"], "/problems/dependency-unavailable");
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{database}\" RESET default_transaction_read_only"
        ))
        .await
        .expect("read-write");
    reconnect_everyone(&admin).await;
    let mut status = 0;
    for _ in 0..10 {
        status = app.put("ro", "a", &json!({"n": 3})).await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "writes resume once the database is writable");
}

#[tokio::test]
async fn a_write_waiting_past_lock_timeout_answers_503_and_commits_nothing() {
    let app = spawn_app_with(TestAppOptions {
        lock_timeout: Some(Duration::from_millis(300)),
        ..TestAppOptions::default()
    })
    .await;
    assert_eq!(app.put("locks", "a", &json!({"n": 1})).await.status(), 201);
    let holder = lock_row(&app.database_url, "locks", "a").await;
    for request in [
        app.write(Method::PUT, "/v1/locks/a").json(&json!({"n": 2})),
        app.write(Method::PUT, "/v1/locks/a")
            .header("idempotency-key", "lock-test")
            .json(&json!({"n": 2})),
    ] {
        let response = request.send().await.expect("sent");
        assert_eq!(response.status(), 503, "lock_timeout (55P03) is transient");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["type"], "/problems/dependency-unavailable");
    }
    holder.batch_execute("ROLLBACK").await.expect("release");
    let current: Value = app.get("/v1/locks/a").await.json().await.expect("json");
    assert_eq!(
        current["version"], 1,
        "the refused writes committed nothing"
    );
    assert_eq!(app.count("outbox").await, 1);
}

#[tokio::test]
async fn a_request_past_its_timeout_answers_503_and_its_write_rolls_back() {
    let app = spawn_app_with(TestAppOptions {
        request_timeout: Some(Duration::from_millis(500)),
        ..TestAppOptions::default()
    })
    .await;
    assert_eq!(app.put("slow", "a", &json!({"n": 1})).await.status(), 201);
    let holder = lock_row(&app.database_url, "slow", "a").await;
    let started = Instant::now();
    let response = app.put("slow", "a", &json!({"n": 2})).await;
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.expect("problem");
    assert_eq!(problem["type"], "/problems/request-timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
    holder.batch_execute("ROLLBACK").await.expect("release");
    // The abandoned write's transaction is rolled back, not committed after the answer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let current: Value = app.get("/v1/slow/a").await.json().await.expect("json");
    assert_eq!(current["version"], 1);
    assert_eq!(app.count("outbox").await, 1);
    assert_eq!(app.put("slow", "a", &json!({"n": 3})).await.status(), 200);
}

/// `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout` of a session,
/// in milliseconds, each with where the session got it from (`pg_settings.source`).
async fn session_limits(client: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    client
        .query(
            "SELECT name, setting, source FROM pg_settings WHERE name IN \
             ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout') \
             ORDER BY name",
            &[],
        )
        .await
        .expect("pg_settings")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// What [`session_limits`] reports for connections opened with `limits`.
fn expected_limits(limits: &SessionLimits) -> Vec<(String, String, String)> {
    let row = |name: &str, value: Duration| {
        (
            name.to_owned(),
            value.as_millis().to_string(),
            "client".to_owned(),
        )
    };
    vec![
        row(
            "idle_in_transaction_session_timeout",
            limits.idle_in_transaction,
        ),
        row("lock_timeout", limits.lock_timeout),
        row("statement_timeout", limits.statement_timeout),
    ]
}

#[tokio::test]
async fn every_database_connection_carries_the_session_time_limits() {
    // The APIs as they run: pools built from their settings (the product's defaults, and a
    // lock_timeout of the test's), the Write API's migrations run on one of its connections.
    let lock_timeout = Duration::from_millis(1250);
    let app = spawn_app_with(TestAppOptions {
        lock_timeout: Some(lock_timeout),
        ..TestAppOptions::default()
    })
    .await;
    let product = SessionLimits {
        lock_timeout,
        ..SessionLimits::default()
    };
    assert_eq!(
        (product.statement_timeout, product.idle_in_transaction),
        (Duration::from_secs(15), Duration::from_secs(30))
    );
    for (api, pool) in [
        ("write", app.write_state.store.pool()),
        ("read", app.read_state.store.pool()),
    ] {
        // Several connections at once: the one that ran the migrations (which lifted two of
        // the limits for them) and fresh ones.
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(pool.get().await.expect("pooled connection"));
        }
        for client in &clients {
            assert_eq!(
                session_limits(client).await,
                expected_limits(&product),
                "{api} API"
            );
        }
    }

    // Every other kind of connection a service opens: the readiness probe's pool and the
    // dedicated session of leader election and LISTEN, with limits set through the settings.
    let mut settings = DatabaseSettings::from_url(&app.database_url);
    settings.limits = SessionLimits {
        statement_timeout: Duration::from_millis(2345),
        lock_timeout: Duration::from_millis(678),
        idle_in_transaction: Duration::from_millis(3456),
    };
    let probe = tandem_store::db::connect_probe(&settings)
        .await
        .expect("probe pool");
    let probe = probe.get().await.expect("probe connection");
    assert_eq!(
        session_limits(&probe).await,
        expected_limits(&settings.limits),
        "probe"
    );
    let session = tandem_store::db::connect_session(&settings)
        .await
        .expect("session");
    assert_eq!(
        session_limits(&session.client).await,
        expected_limits(&settings.limits),
        "session"
    );
}

#[tokio::test]
async fn readiness_answers_while_the_request_pool_is_exhausted() {
    let app = spawn_app().await;
    assert_eq!(app.put("busy", "a", &json!({"n": 1})).await.status(), 201);
    let holder = lock_row(&app.database_url, "busy", "a").await;
    // Every pooled connection of the Write API waits on that lock.
    let writers: Vec<_> = (0..24)
        .map(|n| {
            let request = app
                .write(Method::PUT, "/v1/busy/a")
                .json(&json!({ "n": n }));
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = app
        .client
        .get(format!("{}/readyz", app.write_url))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .expect("readyz answered");
    assert_eq!(ready.status(), 200, "the probe has its own connection");
    holder.batch_execute("ROLLBACK").await.expect("release");
    for writer in writers {
        let status = writer.await.expect("join").expect("sent");
        assert!(matches!(status, 200 | 503), "{status}");
    }
}

#[tokio::test]
async fn list_pages_stop_at_the_byte_budget_and_next_continues() {
    let app = spawn_app().await;
    let big = "p".repeat(200 * 1024);
    for i in 0..8 {
        let response = app.put("pages", &format!("d{i}"), &json!({"s": big})).await;
        assert_eq!(response.status(), 201);
    }
    let mut seen = Vec::new();
    let mut path = "/v1/pages?limit=1000".to_owned();
    let mut pages = 0;
    loop {
        let response = app.get(&path).await;
        assert_eq!(response.status(), 200);
        let bytes = response.bytes().await.expect("body");
        assert!(
            bytes.len() < LAMBDA_MAX_RESPONSE_BYTES,
            "{} bytes",
            bytes.len()
        );
        let page: Value = serde_json::from_slice(&bytes).expect("json");
        let items = page["items"].as_array().expect("items");
        assert!(!items.is_empty());
        let data_bytes: usize = items.iter().map(|i| i["data"].to_string().len()).sum();
        assert!(
            items.len() == 1 || data_bytes <= LIST_PAGE_BYTES,
            "{data_bytes} bytes of documents"
        );
        seen.extend(
            items
                .iter()
                .map(|i| i["id"].as_str().unwrap_or_default().to_owned()),
        );
        pages += 1;
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/pages?limit=1000&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, (0..8).map(|i| format!("d{i}")).collect::<Vec<_>>());
    assert!(pages >= 3, "8 × 200 KiB take several pages, not {pages}");
    // The count limit still holds alongside the byte budget.
    let page: Value = app
        .get("/v1/pages?limit=2")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    assert!(page["next"].is_string());
}

#[tokio::test]
async fn invented_http_methods_share_one_metric_label() {
    let app = spawn_app().await;
    for n in 0..20 {
        let method = Method::from_bytes(format!("BREW{n}").as_bytes()).expect("method");
        let response = app
            .write(method, "/v1/things/a")
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 405);
    }
    let metrics = app
        .client
        .get(format!("{}/metrics", app.write_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(!metrics.contains("BREW"), "{metrics}");
    assert!(
        metrics.contains(r#"method="OTHER",status="405"} 20"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_consistency_token_for_another_document_is_refused() {
    let app = spawn_app().await;
    let response = app.put("tokens", "a", &json!({"n": 1})).await;
    let token = response
        .headers()
        .get("x-consistency-token")
        .and_then(|v| v.to_str().ok())
        .expect("token")
        .to_owned();
    app.put("tokens", "b", &json!({"n": 1})).await;
    for (path, status) in [
        ("/v1/tokens/a", 200),
        ("/v1/tokens/b", 400),
        ("/v1/tokens", 200),
        ("/v1/others", 400),
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.read_url))
            .header("x-consistency-token", &token)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), status, "{path}");
    }
}
