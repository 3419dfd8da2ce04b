//! The one thing a Lambda function must say before its runtime loop exists: why it could not
//! start. A function whose start-up fails (a setting missing, a secret unreadable) reports the
//! error to the Lambda Runtime API's `/runtime/init/error` before it exits, so the invoker gets
//! the reason as the invocation's error (AWS answers the pending invocation with it, and so does
//! `cargo lambda watch`) instead of waiting while the reason sits in the function's log.
//! `lambda_runtime` reports only its own SnapStart errors there; errors before `run` are ours.

use std::time::Duration;

/// How long the report may take: the process is about to exit either way.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `errorType` of the report, and the `Lambda-Runtime-Function-Error-Type` Lambda records.
pub const INIT_ERROR_TYPE: &str = "Runtime.InitError";

/// Reports `error` (its whole cause chain) to the Runtime API when the process runs under one
/// (`AWS_LAMBDA_RUNTIME_API` set), and hands it back for `main` to return. Outside Lambda it
/// only hands it back. A report that fails is logged; the error is returned all the same.
pub async fn report_init_error(error: anyhow::Error) -> anyhow::Error {
    // The Runtime API's address as Lambda (and `cargo lambda watch`) sets it; named literally
    // for scripts/env_contract.py.
    let Some(api) = std::env::var("AWS_LAMBDA_RUNTIME_API")
        .ok()
        .filter(|api| !api.trim().is_empty())
    else {
        return error;
    };
    // Lambda sets `host:port`; `cargo lambda watch` a URL with a path of its own
    // (`http://[::]:9000/.rt/tandem-write`), as lambda_runtime accepts it too.
    let api = api.trim().trim_end_matches('/');
    let base = if api.starts_with("http://") || api.starts_with("https://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    };
    let url = format!("{base}/2018-06-01/runtime/init/error");
    let body = serde_json::json!({
        "errorType": INIT_ERROR_TYPE,
        "errorMessage": format!("{error:#}"),
    });
    let sent = async {
        reqwest::Client::builder()
            .timeout(REPORT_TIMEOUT)
            .build()?
            .post(&url)
            .header("Lambda-Runtime-Function-Error-Type", INIT_ERROR_TYPE)
            .json(&body)
            .send()
            .await?
            .error_for_status()
    }
    .await;
    match sent {
        Ok(_) => tracing::info!("reported the start-up error to the Lambda Runtime API"),
        Err(e) => tracing::warn!(
            error = %e,
            "could not report the start-up error to the Lambda Runtime API"
        ),
    }
    error
}
