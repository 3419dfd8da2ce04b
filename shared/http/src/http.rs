//! HTTP plumbing every service shares: the operations endpoints (`/healthz`, `/readyz`,
//! `/metrics`), request metrics, the region header, panic containment, and the conversion of
//! the framework's own bare error responses (unknown route, wrong method) into problem+json,
//! and the HTTP syntax of the domain: resource paths and entity tags.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::BoxFuture;
use serde::Serialize;

use deadpool_postgres::Pool;
use tandem_core::document::{DocumentKey, EntityTagCondition};

use crate::problem::ApiError;
use tandem_runtime::metrics::{HttpLabels, Metrics};
use tandem_store::cache::Cache;
use tandem_store::documents::Store;

pub const REGION_HEADER: &str = "x-tandem-region";
pub const CONSISTENCY_TOKEN_HEADER: &str = "x-consistency-token";
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";
pub const REPLICATION_LAG_HEADER: &str = "x-tandem-replication-lag-ms";
/// On a write a follower forwards to the write region: the follower's region. A Write API never
/// forwards a request that carries it (no forwarding loop while the regions disagree).
pub const FORWARDED_FROM_HEADER: &str = "x-tandem-forwarded-from";
/// On the answer to a forwarded write: the write region that answered it.
pub const FORWARDED_TO_HEADER: &str = "x-tandem-forwarded-to";

/// A document's canonical resource path, `/v1/{collection}/{id}`: its `Location`, and what an
/// idempotency fingerprint and a consistency token's wait are scoped to.
pub fn document_path(key: &DocumentKey) -> String {
    format!("/v1/{}/{}", key.collection, key.id)
}

/// The strong entity tag of a version: `"<version>"`.
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// Parses an `If-Match` / `If-None-Match` header value: `*`, or a list of entity tags of
/// which those this service could have issued (`"3"`, or `W/"4"`: weak tags compare by value,
/// as `If-None-Match` requires) are kept; a value with none of them can never match.
pub fn parse_entity_tags(value: &str) -> EntityTagCondition {
    if value.trim() == "*" {
        return EntityTagCondition::Any;
    }
    let versions = value
        .split(',')
        .filter_map(|tag| {
            let tag = tag.trim();
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            tag.strip_prefix('"')?
                .strip_suffix('"')?
                .parse::<i64>()
                .ok()
        })
        .collect();
    EntityTagCondition::Versions(versions)
}

/// The outcome of a readiness probe: overall verdict plus one line per dependency.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: BTreeMap<&'static str, String>,
}

impl Readiness {
    /// The APIs' dependencies: PostgreSQL is required; Redis is an optimisation, reported
    /// ("degraded" when it is down) but never required.
    pub async fn of_store_and_cache(store: &Store, cache: &Cache) -> Self {
        let mut checks = BTreeMap::new();
        let db = store.ping().await;
        let ready = db.is_ok();
        checks.insert(
            "postgres",
            db.map_or_else(|e| e.to_string(), |()| "ok".to_owned()),
        );
        let redis = cache.ping().await;
        checks.insert(
            "redis",
            redis.map_or_else(|e| format!("degraded: {e}"), |()| "ok".to_owned()),
        );
        Self { ready, checks }
    }
}

/// Probes dependencies for `/readyz`.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Readiness> + Send + Sync>;

/// Refreshes gauges (pool usage, lag) right before `/metrics` renders.
pub type ScrapeHook = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// Reports the connection pool's usage on every scrape.
pub fn pool_scrape_hook(pool: Pool) -> ScrapeHook {
    Arc::new(move |metrics| metrics.set_pool_usage(tandem_store::db::pool_usage(&pool)))
}

#[derive(Clone)]
struct Ops {
    metrics: Arc<Metrics>,
    ready: ReadyCheck,
    on_scrape: ScrapeHook,
}

/// The operations endpoints, outside `/v1`.
pub fn ops_router(metrics: Arc<Metrics>, ready: ReadyCheck, on_scrape: ScrapeHook) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Ops {
            metrics,
            ready,
            on_scrape,
        })
}

async fn healthz() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        r#"{"status":"ok"}"#,
    )
}

async fn readyz(State(ops): State<Ops>) -> Response {
    let readiness = (ops.ready)().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, axum::Json(readiness)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    response
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    (ops.on_scrape)(&ops.metrics);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        ops.metrics.render(),
    )
}

/// Wraps a service's routes with everything every service needs. Call it last, on the complete
/// Router, so that the layers see every route and the fallback. A request still running after
/// `timeout` is answered 503 (`request-timeout`) and its work dropped (a write's transaction
/// then rolls back: it commits entirely or not at all).
pub fn finish(router: Router, metrics: Arc<Metrics>, region: &str, timeout: Duration) -> Router {
    let region =
        HeaderValue::from_str(region).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    router
        .fallback(|| async { ApiError::NoRoute })
        .layer(middleware::from_fn(
            move |request: Request, next: Next| async move {
                match tokio::time::timeout(timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => ApiError::Timeout {
                        after_ms: timeout.as_millis(),
                    }
                    .into_response(),
                }
            },
        ))
        .layer(middleware::map_response(problem_for_bare_errors))
        .layer(middleware::from_fn_with_state(metrics, track))
        .layer(middleware::map_response(move |mut response: Response| {
            let region = region.clone();
            async move {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(REGION_HEADER), region);
                response
            }
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_panic| {
            ApiError::Internal(anyhow::anyhow!("a request handler panicked")).into_response()
        }))
        .layer(middleware::from_fn(trace_request))
}

/// The routes probes and scrapers call every few seconds: no trace of their own.
const UNTRACED_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The trace context of the request's own span, when spans are exported: what a handler
/// records (`crate::extract::Trace`), so that whatever continues the trace (the relay's
/// publish, through the outbox row) becomes a child of this request.
#[derive(Debug, Clone)]
pub struct RequestTrace(pub tandem_core::traceparent::TraceParent);

/// While spans are exported, runs the request inside a `request` span named by its route
/// template, the child of the client's `traceparent` when it sent a valid one. Otherwise (no
/// exporter) the request runs as before, without a span.
async fn trace_request(mut request: Request, next: Next) -> Response {
    use tracing::Instrument;
    use tracing::field::Empty;
    if !tandem_runtime::telemetry::enabled() {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    if UNTRACED_ROUTES.contains(&route.as_str()) {
        return next.run(request).await;
    }
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = Empty,
    );
    if let Some(parent) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        tandem_runtime::telemetry::continue_trace(&span, parent);
    }
    if let Some(own) = tandem_runtime::telemetry::traceparent(&span) {
        request.extensions_mut().insert(RequestTrace(own));
    }
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// Counts and times every request by its route template (never the raw path: ids would
/// explode the label cardinality).
async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // Only the methods HTTP defines get a label of their own: a client inventing methods must
    // not be able to add time series.
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" | "TRACE"
        | "CONNECT") => m,
        _ => "OTHER",
    }
    .to_owned();
    let response = next.run(request).await;
    let labels = HttpLabels {
        route,
        method,
        status: response.status().as_u16(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_latency
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The router answers an unknown method with a bare 405 (and its `Allow` header); give it the
/// problem+json body every other error has, keeping `Allow`.
async fn problem_for_bare_errors(response: Response) -> Response {
    if response.headers().contains_key(header::CONTENT_TYPE) {
        return response;
    }
    let problem = match response.status() {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::NOT_FOUND => ApiError::NoRoute,
        _ => return response,
    };
    let (parts, _) = response.into_parts();
    let mut rewritten = problem.into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        rewritten.headers_mut().insert(header::ALLOW, allow.clone());
    }
    rewritten
}

/// Builds an empty-bodied response (e.g. 204, 304) with headers.
pub fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::document::{Collection, DocumentId, Preconditions};

    #[test]
    fn entity_tags_parse_as_rfc_9110_writes_them() {
        assert_eq!(parse_entity_tags(" * "), EntityTagCondition::Any);
        assert_eq!(
            parse_entity_tags("\"1\", W/\"4\", \"x\", 5"),
            EntityTagCondition::Versions(vec![1, 4])
        );
        assert_eq!(
            parse_entity_tags("garbage"),
            EntityTagCondition::Versions(vec![])
        );
        assert_eq!(
            parse_entity_tags(&etag(7)),
            EntityTagCondition::Versions(vec![7])
        );
        let m = |v: &str| Preconditions {
            if_match: Some(parse_entity_tags(v)),
            if_none_match: None,
        };
        assert!(m("\"1\", \"4\"").hold(Some(4)));
        assert!(!m("garbage").hold(Some(1)));
    }

    #[test]
    fn documents_live_under_v1() {
        let key = DocumentKey::new(
            Collection::parse("orders").expect("valid"),
            DocumentId::parse("a.b~c").expect("valid"),
        );
        assert_eq!(document_path(&key), "/v1/orders/a.b~c");
    }
}
