//! Both functions driven through Lambda events: the shipped ALB and API Gateway (REST and HTTP
//! API) fixtures go through lambda_http's own request conversion and response encoding, exactly
//! as `lambda_http::run` does in AWS.

use std::path::PathBuf;

use lambda_http::request::LambdaRequest;
use lambda_runtime::{Context, LambdaEvent};
use serde_json::Value;
use tandem_http::auth::DEV_HS256_SECRET;
use tandem_tests::{TestAppOptions, spawn_app_with};
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
