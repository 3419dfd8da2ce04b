use reqwest::Method;
use serde_json::{Value, json};
use tandem_tests::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_puts_with_the_same_if_match_let_exactly_one_through() {
    let app = spawn_app().await;
    assert_eq!(
        app.put("counters", "c", &json!({"n": 0})).await.status(),
        201
    );
    let requests = (0..50).map(|i| {
        app.write(Method::PUT, "/v1/counters/c")
            .header("if-match", "\"1\"")
            .json(&json!({"n": i}))
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.expect("send").status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 412).count(),
        49,
        "{statuses:?}"
    );
    let body: Value = app.get("/v1/counters/c").await.json().await.expect("json");
    assert_eq!(body["version"], 2);
    assert_eq!(app.count("outbox").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_id_serialise_into_consecutive_versions() {
    let app = spawn_app().await;
    let requests = (0..20).map(|i| {
        app.write(Method::PUT, "/v1/race/r")
            .json(&json!({"i": i}))
            .send()
    });
    let mut created = 0;
    for response in futures_util::future::join_all(requests).await {
        match response.expect("send").status().as_u16() {
            201 => created += 1,
            200 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(created, 1);
    let client = app.pool.get().await.expect("db");
    let versions: Vec<i64> = client
        .query(
            "SELECT version FROM outbox WHERE document_id = 'r' ORDER BY seq",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        versions,
        (1..=20).collect::<Vec<i64>>(),
        "outbox order must follow version order"
    );
}
