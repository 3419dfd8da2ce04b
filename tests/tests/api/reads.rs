use reqwest::Method;
use serde_json::{Value, json};
use tandem_tests::spawn_app;

#[tokio::test]
async fn get_head_and_conditional_get_follow_the_contract() {
    let app = spawn_app().await;
    app.put("books", "b1", &json!({"title": "Dune"})).await;
    app.put("books", "b1", &json!({"title": "Dune Messiah"}))
        .await;

    let response = app.get("/v1/books/b1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"2\"");
    assert_eq!(response.headers()["x-tandem-region"], "region1");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["data"]["title"], "Dune Messiah");
    assert_eq!(body["version"], 2);
    for field in [
        "collection",
        "id",
        "version",
        "data",
        "created_at",
        "updated_at",
    ] {
        assert!(body.get(field).is_some(), "missing {field}");
    }

    let head = app
        .client
        .head(format!("{}/v1/books/b1", app.read_url))
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["etag"], "\"2\"");
    assert!(head.bytes().await.expect("body").is_empty());

    let conditional = |tag: &'static str| {
        app.client
            .get(format!("{}/v1/books/b1", app.read_url))
            .header("if-none-match", tag)
            .send()
    };
    let not_modified = conditional("\"2\"").await.expect("send");
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], "\"2\"");
    assert_eq!(conditional("\"1\"").await.expect("send").status(), 200);
    assert_eq!(conditional("*").await.expect("send").status(), 304);

    assert_eq!(app.get("/v1/books/none").await.status(), 404);
    let head_missing = app
        .client
        .head(format!("{}/v1/books/none", app.read_url))
        .send()
        .await
        .expect("head");
    assert_eq!(head_missing.status(), 404);
}

#[tokio::test]
async fn listing_pages_by_id_with_a_cursor_and_skips_deleted_documents() {
    let app = spawn_app().await;
    let mut ids: Vec<String> = (0..25).map(|i| format!("doc-{i:02}")).collect();
    // Insert out of order; bytewise id order must come back.
    for id in ids.iter().rev() {
        app.put("pages", id, &json!({"id": id})).await;
    }
    app.put("other", "x", &json!({})).await;
    assert_eq!(
        app.write(Method::DELETE, "/v1/pages/doc-05")
            .send()
            .await
            .expect("send")
            .status(),
        204
    );
    ids.retain(|id| id != "doc-05");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/pages?limit=10&after={c}"),
            None => "/v1/pages?limit=10".to_owned(),
        };
        let page: Value = app.get(&path).await.json().await.expect("json");
        pages += 1;
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 10);
        seen.extend(
            items
                .iter()
                .map(|d| d["id"].as_str().expect("id").to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    let default_page: Value = app.get("/v1/pages").await.json().await.expect("json");
    assert_eq!(default_page["items"].as_array().expect("items").len(), 24);
    assert!(default_page["next"].is_null());
    let empty: Value = app
        .get("/v1/nothing-here")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(empty, json!({"items": [], "next": null}));
}
