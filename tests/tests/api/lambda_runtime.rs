//! The function binaries under a Lambda Runtime API, as Lambda and `cargo lambda watch` run
//! them: a small emulator of the API (the `2018-06-01` routes a runtime calls) hands the real
//! binary an event and records what it posts back. A function that cannot start reports why to
//! `/runtime/init/error`, so the invoker is told instead of left waiting.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tandem_http::auth::DEV_HS256_SECRET;
use tandem_tests::{TestAppOptions, binary, serve, spawn_app_with};
use tokio::sync::{Mutex, mpsc};

/// What a function posted to the Runtime API.
#[derive(Debug)]
struct Report {
    /// `response`, `error` (an invocation's) or `init-error`.
    kind: &'static str,
    /// The `Lambda-Runtime-Function-Error-Type` header, when sent.
    error_type: Option<String>,
    body: Value,
}

struct Emulator {
    /// Events waiting for the function's next `/invocation/next`.
    events: Mutex<mpsc::Receiver<Value>>,
    reports: mpsc::Sender<Report>,
}

/// The Runtime API on a loopback port: its `host:port` (what `AWS_LAMBDA_RUNTIME_API` holds),
/// the sender of events to invoke with, the receiver of what the function posts.
async fn runtime_api() -> (String, mpsc::Sender<Value>, mpsc::Receiver<Report>) {
    let (event_tx, event_rx) = mpsc::channel(8);
    let (report_tx, report_rx) = mpsc::channel(8);
    let emulator = Arc::new(Emulator {
        events: Mutex::new(event_rx),
        reports: report_tx,
    });
    let router = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next_invocation))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(|state, id, headers, body| record("response", state, id, headers, body)),
        )
        .route(
            "/2018-06-01/runtime/invocation/{id}/error",
            post(|state, id, headers, body| record("error", state, id, headers, body)),
        )
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .with_state(emulator);
    let url = serve(router).await;
    let address = url.trim_start_matches("http://").to_owned();
    (address, event_tx, report_rx)
}

async fn next_invocation(State(emulator): State<Arc<Emulator>>) -> Response {
    let Some(event) = emulator.events.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + Duration::from_secs(60);
    (
        [
            ("lambda-runtime-aws-request-id", "request-1".to_owned()),
            (
                "lambda-runtime-deadline-ms",
                deadline.as_millis().to_string(),
            ),
            (
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:eu-west-1:000000000000:function:test".to_owned(),
            ),
            ("content-type", "application/json".to_owned()),
        ],
        event.to_string(),
    )
        .into_response()
}

async fn record(
    kind: &'static str,
    State(emulator): State<Arc<Emulator>>,
    Path(_id): Path<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    report(&emulator, kind, &headers, &body).await
}

async fn init_error(
    State(emulator): State<Arc<Emulator>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    report(&emulator, "init-error", &headers, &body).await
}

async fn report(
    emulator: &Emulator,
    kind: &'static str,
    headers: &HeaderMap,
    body: &str,
) -> StatusCode {
    let report = Report {
        kind,
        error_type: headers
            .get("lambda-runtime-function-error-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned())),
    };
    let _ = emulator.reports.send(report).await;
    StatusCode::ACCEPTED
}

/// Starts a function binary under the emulator with exactly `settings` (and the variables
/// Lambda itself sets), nothing inherited from the test's environment.
fn start_function(
    name: &str,
    runtime_api: &str,
    settings: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(binary(name))
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", runtime_api)
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .envs(settings.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("start {name} (built by `cargo build --workspace --bins`?): {e}")
        })
}

async fn next_report(reports: &mut mpsc::Receiver<Report>, function: &str) -> Report {
    tokio::time::timeout(Duration::from_secs(60), reports.recv())
        .await
        .unwrap_or_else(|_| panic!("{function} posted nothing to the Runtime API within 60 s"))
        .expect("the emulator runs")
}

#[tokio::test]
async fn a_function_missing_its_settings_reports_an_init_error_naming_them() {
    // (binary, settings it gets, the setting its error must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        ("tandem-write", &[], "DATABASE_URL"),
        ("tandem-read", &[], "DATABASE_URL"),
        ("tandem-region2-apply-lambda", &[], "DATABASE_URL"),
        (
            "tandem-write",
            &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres")],
            "REDIS_URL",
        ),
    ];
    for (function, settings, missing) in cases {
        let (api, _events, mut reports) = runtime_api().await;
        let mut child = start_function(function, &api, settings);
        let report = next_report(&mut reports, function).await;
        assert_eq!(report.kind, "init-error", "{function}: {report:?}");
        assert_eq!(
            report.error_type.as_deref(),
            Some("Runtime.InitError"),
            "{function}: {report:?}"
        );
        assert_eq!(report.body["errorType"], "Runtime.InitError", "{function}");
        let message = report.body["errorMessage"].as_str().unwrap_or_default();
        assert!(
            message.contains(missing) && message.contains("Invalid configuration"),
            "{function}: the init error names {missing}: {message:?}"
        );
        // Then it exits (Lambda's contract after an init error), with a failure status.
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{function} did not exit after its init error"))
            .expect("wait");
        assert!(!status.success(), "{function} exited with {status}");
    }
}

#[tokio::test]
async fn the_write_function_binary_answers_an_alb_event_through_the_runtime_api() {
    let app = spawn_app_with(TestAppOptions {
        // The fixture's dev token is signed with it.
        secret: Some(DEV_HS256_SECRET.into()),
        ..Default::default()
    })
    .await;
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../functions/write/events/alb-put.json");
    let event: Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture).expect("the ALB fixture"))
            .expect("JSON");
    let (api, events, mut reports) = runtime_api().await;
    let _function = start_function(
        "tandem-write",
        &api,
        &[
            ("DATABASE_URL", &app.database_url),
            ("REDIS_URL", &app.redis_url),
            ("REDIS_KEY_PREFIX", &app.cache_prefix),
            ("TANDEM_JWT_HS256_SECRET", DEV_HS256_SECRET),
            ("TANDEM_DEV_MODE", "true"),
        ],
    );
    events.send(event).await.expect("queue the event");
    let report = next_report(&mut reports, "tandem-write").await;
    assert_eq!(report.kind, "response", "{report:?}");
    assert_eq!(report.body["statusCode"], 201, "{report:?}");
    let stored = app
        .client
        .get(format!("{}/v1/orders/lambda-1", app.read_url))
        .send()
        .await
        .expect("read back");
    assert_eq!(stored.status(), 200);
}
