//! Both functions driven through Lambda events: the shipped ALB and API Gateway (REST and HTTP
//! API) fixtures go through lambda_http's own request conversion and response encoding, exactly
//! as `lambda_http::run` does in AWS.

use std::path::PathBuf;

use lambda_http::request::LambdaRequest;
use lambda_runtime::{Context, LambdaEvent};
use serde_json::Value;
use tandem_http::auth::DEV_HS256_SECRET;
use tandem_tests::{TestAppOptions, spawn_app, spawn_app_with};
use tower::ServiceExt;

fn fixture(function: &str, name: &str) -> LambdaRequest {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../functions")
        .join(function)
        .join("events")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not a Lambda HTTP event: {e}"))
}

async fn invoke(router: axum::Router, event: LambdaRequest) -> Value {
    let service = tandem_http::serve::lambda_service(router);
    let adapter = lambda_http::Adapter::from(service);
    let response = adapter
        .oneshot(LambdaEvent::new(event, Context::default()))
        .await
        .expect("the adapter never fails");
    serde_json::to_value(response).expect("response serialises")
}

/// A response header, wherever the payload format puts it (REST API responses use
/// `multiValueHeaders`).
fn header<'a>(response: &'a Value, name: &str) -> Option<&'a str> {
    response["headers"][name]
        .as_str()
        .or_else(|| response["multiValueHeaders"][name][0].as_str())
}

fn body(response: &Value) -> Value {
    serde_json::from_str(response["body"].as_str().unwrap_or("null")).expect("JSON body")
}

#[tokio::test]
async fn both_functions_answer_alb_and_api_gateway_events_with_matching_routes() {
    let app = spawn_app_with(TestAppOptions {
        // The fixtures' dev token is signed with it (see README, local Lambda workflow).
        secret: Some(DEV_HS256_SECRET.into()),
        ..Default::default()
    })
    .await;
    let write = || tandem_write::router(app.write_state.clone());
    let read = || tandem_read::router(app.read_state.clone());

    let created = invoke(write(), fixture("write", "alb-put.json")).await;
    assert_eq!(created["statusCode"], 201, "{created}");
    assert_eq!(header(&created, "location"), Some("/v1/orders/lambda-1"));
    assert_eq!(header(&created, "etag"), Some("\"1\""));
    assert!(header(&created, "x-consistency-token").is_some());
    assert_eq!(body(&created)["data"]["total"], 42);

    // REST API with the "prod" stage in the path: the same route matches.
    let replaced = invoke(write(), fixture("write", "apigw-rest-put.json")).await;
    assert_eq!(replaced["statusCode"], 200, "{replaced}");
    assert_eq!(body(&replaced)["version"], 2);

    // HTTP API with a named stage, merge patch.
    let patched = invoke(write(), fixture("write", "apigw-http-patch.json")).await;
    assert_eq!(patched["statusCode"], 200, "{patched}");
    assert_eq!(
        body(&patched)["data"],
        serde_json::json!({"total": 43, "currency": "EUR", "status": "paid"})
    );

    let posted = invoke(write(), fixture("write", "alb-post.json")).await;
    assert_eq!(posted["statusCode"], 201, "{posted}");

    for name in ["alb-get.json", "apigw-rest-get.json"] {
        let got = invoke(read(), fixture("read", name)).await;
        assert_eq!(got["statusCode"], 200, "{name}: {got}");
        assert_eq!(header(&got, "etag"), Some("\"3\""), "{name}");
        assert_eq!(header(&got, "x-tandem-region"), Some("region1"), "{name}");
        assert_eq!(body(&got)["data"]["status"], "paid", "{name}");
    }
    let listed = invoke(read(), fixture("read", "apigw-http-list.json")).await;
    assert_eq!(listed["statusCode"], 200, "{listed}");
    let page = body(&listed);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    assert!(page["next"].is_null());

    let health = invoke(read(), fixture("read", "alb-healthz.json")).await;
    assert_eq!(health["statusCode"], 200);

    // Errors keep their problem+json shape through the Lambda encoding.
    let mut unauthenticated = fixture("write", "alb-put.json");
    if let LambdaRequest::Alb(alb) = &mut unauthenticated {
        alb.headers.remove("authorization");
    }
    let refused = invoke(write(), unauthenticated).await;
    assert_eq!(refused["statusCode"], 401);
    assert_eq!(
        header(&refused, "content-type"),
        Some("application/problem+json")
    );
}

/// The read fixture's ALB event, for another path and query.
fn alb_get(path: &str, query: &[(&str, &str)]) -> LambdaRequest {
    let file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../functions/read/events/alb-get.json");
    let mut event: Value =
        serde_json::from_str(&std::fs::read_to_string(file).expect("fixture")).expect("json");
    event["path"] = Value::from(path);
    event["queryStringParameters"] = query
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    serde_json::from_value(event).expect("an ALB event")
}

#[tokio::test]
async fn lambda_responses_fit_the_alb_even_when_escaping_doubles_them() {
    let app = spawn_app().await;
    // Documents of nothing but backslashes: 200 KiB stored each, twice that once the Lambda
    // transport escapes the response body into its JSON envelope.
    let backslashes = "\\".repeat(100 * 1024);
    for i in 0..5 {
        let response = app
            .put(
                "escaped",
                &format!("d{i}"),
                &serde_json::json!({"s": backslashes}),
            )
            .await;
        assert_eq!(response.status(), 201);
    }
    let read = || tandem_read::router(app.read_state.clone());
    let mut seen = 0;
    let mut after: Option<String> = None;
    loop {
        let mut query = vec![("limit", "1000")];
        if let Some(after) = &after {
            query.push(("after", after));
        }
        let response = invoke(read(), alb_get("/v1/escaped", &query)).await;
        let encoded = serde_json::to_vec(&response).expect("encodes").len();
        assert_eq!(response["statusCode"], 200, "{}", response["body"]);
        assert!(
            encoded < tandem_core::limits::LAMBDA_MAX_RESPONSE_BYTES,
            "a page the ALB would refuse: {encoded} bytes"
        );
        let page = body(&response);
        seen += page["items"].as_array().expect("items").len();
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, 5);

    // One document the Lambda transport cannot carry: 500 KB of quotes and backslashes
    // (written in two merge patches, each within the request limit).
    let half = "\\".repeat(125 * 1024);
    app.put("escaped", "huge", &serde_json::json!({"a": half}))
        .await;
    let patched = app
        .client
        .patch(format!("{}/v1/escaped/huge", app.write_url))
        .bearer_auth(&app.token)
        .header("content-type", "application/merge-patch+json")
        .body(serde_json::json!({"b": half}).to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    let response = invoke(read(), alb_get("/v1/escaped/huge", &[])).await;
    assert_eq!(response["statusCode"], 413, "{}", response["body"]);
    assert_eq!(
        header(&response, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(body(&response)["type"], "/problems/response-too-large");
    // The same document over plain HTTP (the EKS pods) is served.
    assert_eq!(app.get("/v1/escaped/huge").await.status(), 200);
}
