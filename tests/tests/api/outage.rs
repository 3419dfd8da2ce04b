use serde_json::{Value, json};
use tandem_tests::{Postgres, TestAppOptions, spawn_app_with};

#[tokio::test]
async fn with_postgres_down_uncached_reads_and_writes_answer_503_and_recover() {
    let mut pg = Postgres::start().expect("postgres");
    let app = spawn_app_with(TestAppOptions {
        database_url: Some(pg.url("postgres")),
        ..Default::default()
    })
    .await;
    app.put("docs", "cached", &json!({"v": 1})).await;

    pg.stop();
    let miss = app.get("/v1/docs/uncached").await;
    assert_eq!(miss.status(), 503);
    assert_eq!(miss.headers()["content-type"], "application/problem+json");
    assert!(miss.headers().contains_key("retry-after"));
    let text = miss.text().await.expect("body");
    assert!(
        !text.contains("Connection refused") && !text.contains("127.0.0.1"),
        "leaks: {text}"
    );
    assert_eq!(app.put("docs", "x", &json!({})).await.status(), 503);
    assert_eq!(app.get("/v1/docs").await.status(), 503);
    for base in [&app.read_url, &app.write_url] {
        let ready = app
            .client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 503);
        let health = app
            .client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status(), 200, "the process itself is fine");
    }
    // A document already in the cache is still served.
    let cached: Value = app.get("/v1/docs/cached").await.json().await.expect("json");
    assert_eq!(cached["version"], 1);

    pg.restart().expect("restart postgres");
    let mut recovered = false;
    for _ in 0..50 {
        if app.put("docs", "x", &json!({})).await.status() == 201 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "writes did not recover after PostgreSQL came back"
    );
    assert_eq!(app.get("/v1/docs/x").await.status(), 200);
}
