//! The transport adapter: one axum `Router`, served either by the AWS Lambda runtime (when
//! `AWS_LAMBDA_RUNTIME_API` is set, as Lambda and `cargo lambda watch` do) or as a plain HTTP
//! server on `PORT` (EKS, local). Handlers never know which.

use std::convert::Infallible;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tower::ServiceExt;

use tandem_core::limits::LAMBDA_MAX_RESPONSE_BYTES;
use tandem_runtime::config::ServiceSettings;

/// Runs the router until SIGTERM/Ctrl-C (HTTP) or for the Lambda sandbox's lifetime.
pub async fn run(router: Router, settings: &ServiceSettings) -> anyhow::Result<()> {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        tracing::info!("starting under the AWS Lambda runtime");
        // One invocation at a time unless AWS_LAMBDA_MAX_CONCURRENCY asks for more: the
        // router is shared state behind Arcs, so concurrent invocations need nothing else.
        lambda_http::run_concurrent(lambda_service(router))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime failed: {e}"))
    } else {
        let listener = TcpListener::bind((settings.bind_address, settings.port))
            .await
            .with_context(|| {
                format!("Failed to bind {}:{}", settings.bind_address, settings.port)
            })?;
        tracing::info!(address = %listener.local_addr()?, "listening");
        serve(
            listener,
            router,
            tandem_runtime::shutdown::shutdown_signal(),
        )
        .await
    }
}

/// Serves HTTP until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server failed")
}

/// The Router as a Lambda service. API Gateway puts a named stage in front of the path
/// (`/prod/v1/...`); strip it so the routes match exactly as they do behind the ALB.
/// (`lambda_http` can leave the stage out itself, but only when the function's environment
/// sets `AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH`: a deployment that forgot it would answer every
/// request 404. Stripping here makes the routes independent of that setting.)
///
/// Each invocation's spans are exported before it returns (bounded by
/// `telemetry::FLUSH_LIMIT`; nothing when traces are off): Lambda freezes the sandbox between
/// invocations, the batch exporter's thread with it, and may retire it before it thaws. The
/// request's span has ended by then: it closes when the router's future completes.
pub fn lambda_service(
    router: Router,
) -> impl tower::Service<
    lambda_http::Request,
    Response = LambdaResponse,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    router.map_request(strip_stage).then(
        |result: Result<axum::response::Response, Infallible>| async move {
            match result {
                Ok(response) => {
                    let response = lambda_response(response).await;
                    tandem_runtime::telemetry::flush().await;
                    Ok(response)
                }
                Err(never) => match never {},
            }
        },
    )
}

/// A response with its body collected, as the Lambda runtime sends it: text or binary.
pub type LambdaResponse = lambda_http::Response<lambda_http::Body>;

/// Collects the body and encodes it the way `lambda_http` would (text for textual content
/// types, base64 otherwise), capped: the ALB passes at most [`LAMBDA_MAX_RESPONSE_BYTES`] from
/// a Lambda function, measured as the JSON the runtime sends it, and answers a bigger response
/// with a bare 502. The page budget keeps every list page below it; a document whose encoding
/// is larger (only one over about 480 KB that is mostly quotes or backslashes) gets a problem
/// naming the limit instead.
async fn lambda_response(response: axum::response::Response) -> LambdaResponse {
    use axum::response::IntoResponse as _;
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "response body failed");
            let problem =
                crate::problem::ApiError::Internal(anyhow::anyhow!("response body failed: {e}"))
                    .into_response();
            return Box::pin(lambda_response(problem)).await;
        }
    };
    let encoded = lambda_encoded_len(&parts.headers, &bytes);
    if encoded > LAMBDA_MAX_RESPONSE_BYTES {
        tracing::error!(
            bytes = encoded,
            "response too large for the Lambda transport"
        );
        let problem = crate::problem::ApiError::ResponseTooLarge {
            limit: LAMBDA_MAX_RESPONSE_BYTES,
        }
        .into_response();
        return Box::pin(lambda_response(problem)).await;
    }
    let body = if bytes.is_empty() {
        lambda_http::Body::Empty
    } else if is_textual(&parts.headers) {
        match String::from_utf8(bytes.to_vec()) {
            Ok(text) => lambda_http::Body::Text(text),
            Err(e) => lambda_http::Body::Binary(e.into_bytes()),
        }
    } else {
        lambda_http::Body::Binary(bytes.to_vec())
    };
    lambda_http::Response::from_parts(parts, body)
}

fn is_textual(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_text_content_type)
}

/// The size of a response as `lambda_http` hands it to the ALB: a textual body as a JSON string
/// (each `"` and `\` escaped, control characters as `\u00XX`; serde_json leaves other UTF-8 as
/// it is), any other body in base64, every header twice (`headers` and `multiValueHeaders`),
/// and the envelope around them.
fn lambda_encoded_len(headers: &axum::http::HeaderMap, body: &[u8]) -> usize {
    const ENVELOPE: usize = 128;
    let textual = is_textual(headers) && std::str::from_utf8(body).is_ok();
    let body = if textual {
        body.iter()
            .map(|&b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
                0..=0x1f => 6,
                _ => 1,
            })
            .sum()
    } else {
        body.len().div_ceil(3) * 4
    };
    let headers: usize = headers
        .iter()
        .map(|(name, value)| 2 * (name.as_str().len() + 2 * value.len() + 8))
        .sum();
    ENVELOPE + body + headers
}

/// The content types `lambda_http` sends as text rather than base64.
fn is_text_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    [
        "text/",
        "application/json",
        "application/javascript",
        "application/xml",
        "application/yaml",
    ]
    .iter()
    .any(|prefix| essence.starts_with(prefix))
        || ["+xml", "+yaml", "+json"]
            .iter()
            .any(|suffix| essence.ends_with(suffix))
}

fn strip_stage(mut request: lambda_http::Request) -> lambda_http::Request {
    use lambda_http::request::RequestContext;
    let stage = match request.extensions().get::<RequestContext>() {
        Some(RequestContext::ApiGatewayV1(context)) => context.stage.clone(),
        Some(RequestContext::ApiGatewayV2(context)) => context.stage.clone(),
        _ => None,
    };
    let Some(stage) = stage.filter(|s| !s.is_empty() && s != "$default") else {
        return request;
    };
    let prefix = format!("/{stage}");
    let path = request.uri().path();
    let rest = match path.strip_prefix(&prefix) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => return request,
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_owned(),
    };
    let mut parts = request.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;

    #[tokio::test]
    async fn a_response_over_the_lambda_limit_becomes_a_problem() {
        let small = axum::response::Response::new(Body::from(vec![b'x'; 1000]));
        assert_eq!(lambda_response(small).await.status(), StatusCode::OK);
        let large =
            axum::response::Response::new(Body::from(vec![b'x'; LAMBDA_MAX_RESPONSE_BYTES + 1]));
        let capped = lambda_response(large).await;
        assert_eq!(capped.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            capped.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..])
        );
    }

    #[test]
    fn escaping_and_base64_count_as_the_runtime_encodes_them() {
        let mut json = axum::http::HeaderMap::new();
        json.insert(
            "content-type",
            axum::http::HeaderValue::from_static("application/problem+json"),
        );
        let plain = lambda_encoded_len(&json, b"{}");
        assert_eq!(lambda_encoded_len(&json, br#"{"a":"\\"}"#) - plain, 16 - 2);
        assert_eq!(lambda_encoded_len(&json, b"\x01") - plain, 6 - 2);
        let none = axum::http::HeaderMap::new();
        assert_eq!(lambda_encoded_len(&none, &[0u8; 300]), 128 + 400);
    }
}
