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
        lambda_http::run(lambda_service(router))
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
pub fn lambda_service(
    router: Router,
) -> impl tower::Service<
    lambda_http::Request,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    router.map_request(strip_stage).map_response(cap_response)
}

/// The ALB passes at most [`LAMBDA_MAX_RESPONSE_BYTES`] from a Lambda function (headers
/// included) and answers a bigger response with a bare 502. The document and page limits keep
/// every response below it; should one still be larger, the client gets a problem naming the
/// limit instead.
fn cap_response(response: axum::response::Response) -> axum::response::Response {
    use axum::body::HttpBody as _;
    use axum::response::IntoResponse as _;
    let hint = response.body().size_hint();
    let body = hint.exact().unwrap_or_else(|| hint.lower());
    let headers: u64 = response
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len() + 4) as u64)
        .sum();
    if body + headers > LAMBDA_MAX_RESPONSE_BYTES as u64 {
        tracing::error!(
            bytes = body + headers,
            "response too large for the Lambda transport"
        );
        return crate::problem::ApiError::ResponseTooLarge {
            limit: LAMBDA_MAX_RESPONSE_BYTES,
        }
        .into_response();
    }
    response
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

    #[test]
    fn a_response_over_the_lambda_limit_becomes_a_problem() {
        let small = axum::response::Response::new(Body::from(vec![b'x'; 1000]));
        assert_eq!(cap_response(small).status(), StatusCode::OK);
        let large =
            axum::response::Response::new(Body::from(vec![b'x'; LAMBDA_MAX_RESPONSE_BYTES + 1]));
        let capped = cap_response(large);
        assert_eq!(capped.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            capped.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..])
        );
    }
}
