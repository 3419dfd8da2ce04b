//! Handlers: extract and validate, look up (cache, then PostgreSQL), map to a response.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::FutureExt;
use tandem_core::consistency::ConsistencyToken;
use tandem_core::document::Stored;
use tandem_core::document::{DocumentId, DocumentKey};
use tandem_http::extract::{CollectionPath, DocumentPath, Reader};
use tandem_http::http::{
    CONSISTENCY_TOKEN_HEADER, REPLICATION_LAG_HEADER, Readiness, ReadyCheck, document_path, etag,
    finish, ops_router, parse_entity_tags, pool_scrape_hook,
};
use tandem_http::problem::ApiError;
use tandem_store::cache::Entry;

use crate::replica::TokenWait;
use crate::{AppState, RouterState};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// The complete Read API.
pub fn router(state: AppState) -> Router {
    let state = RouterState::new(state);
    let metrics = state.metrics.clone();
    let region = state.region.clone();
    let timeout = state.request_timeout;
    let ready: ReadyCheck = {
        let state = state.clone();
        Arc::new(move || {
            let state = state.clone();
            async move {
                let mut readiness = Readiness::of_store_and_cache(&state.store, &state.cache).await;
                if let Some(replica) = state.active_replica() {
                    let limit = replica.settings.max_lag.as_millis();
                    let (ok, line) = match replica.lag_ms() {
                        Some(ms) if u128::from(ms) <= limit => (true, format!("{ms} ms")),
                        Some(ms) => (false, format!("{ms} ms exceeds {limit} ms")),
                        None => (
                            false,
                            "unknown: no relay heartbeat has been applied yet".to_owned(),
                        ),
                    };
                    readiness.ready &= ok;
                    readiness.checks.insert("replication_lag", line);
                }
                readiness
            }
            .boxed()
        })
    };
    let on_scrape = {
        let pool_usage = pool_scrape_hook(state.store.pool().clone());
        let replica = state.replica.clone();
        let gauge = state.lag_gauge.clone();
        let cache = state.cache.clone();
        let near_gauge = state.near_cache_gauge.clone();
        let hook: tandem_http::http::ScrapeHook = Arc::new(move |metrics| {
            pool_usage(metrics);
            let (_, bytes) = cache.near_cache_usage().unwrap_or_default();
            near_gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            if let Some(lag) = replica
                .as_ref()
                .filter(|r| r.is_active())
                .and_then(|r| r.lag_ms())
            {
                gauge.set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
        });
        hook
    };
    let api = Router::new()
        .route("/v1/{collection}", get(list_documents))
        .route("/v1/{collection}/{id}", get(get_document))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            report_lag,
        ))
        .with_state(state);
    finish(
        api.merge(ops_router(metrics.clone(), ready, on_scrape)),
        metrics,
        &region,
        timeout,
    )
}

async fn get_document(
    State(app): State<RouterState>,
    _: Reader,
    DocumentPath(key): DocumentPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let min_version =
        honour_consistency_token(&app, &headers, &document_path(&key), Some(&key)).await?;
    let Some(Entry::Live { version, body }) = lookup(&app, &key, min_version).await? else {
        return Err(ApiError::NotFound);
    };
    let tag = HeaderValue::from_str(&etag(version)).map_err(|e| ApiError::Internal(e.into()))?;
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| parse_entity_tags(v).matches(Some(version)));
    let mut response = if not_modified {
        tandem_http::http::empty(StatusCode::NOT_MODIFIED)
    } else {
        let mut response = body.into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    };
    response.headers_mut().insert(header::ETAG, tag);
    Ok(response)
}

/// Cache first; on a miss, PostgreSQL, then a version-guarded fill into the generation the
/// lookup saw. A cached entry older than `min_version` (a consistency token's) is a miss. With
/// Redis unavailable or distrusted the read goes straight to PostgreSQL (counted as `bypass`).
async fn lookup(
    app: &AppState,
    key: &DocumentKey,
    min_version: Option<i64>,
) -> Result<Option<Entry>, ApiError> {
    let found = app.cache.lookup_near(key).await;
    let generation = match found {
        Ok(found) => match found.entry {
            Some(entry) if min_version.is_none_or(|min| entry.version() >= min) => {
                if found.from_memory {
                    app.metrics.cache("near_hit");
                } else {
                    app.metrics.cache("hit");
                }
                return Ok(Some(entry));
            }
            _ => {
                app.metrics.cache("miss");
                Some(found.generation)
            }
        },
        Err(e) => {
            app.metrics.cache("bypass");
            tracing::debug!(error = %e, "cache bypassed");
            None
        }
    };
    let entry = match app.store.get(key).await? {
        None => return Ok(None),
        Some(Stored::Live(document)) => Entry::Live {
            version: document.version,
            body: document.to_body(),
        },
        Some(Stored::Deleted { version }) => Entry::Deleted { version },
    };
    if let Some(generation) = generation {
        if let Err(e) = app.cache.fill(key, &entry, &generation).await {
            tracing::debug!(error = %e, "cache fill failed");
        }
    }
    Ok(Some(entry))
}

async fn list_documents(
    State(app): State<RouterState>,
    _: Reader,
    CollectionPath(collection): CollectionPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (limit, after) = page_parameters(query.as_deref())?;
    let list_path = match &query {
        Some(q) => format!("/v1/{collection}?{q}"),
        None => format!("/v1/{collection}"),
    };
    honour_consistency_token(&app, &headers, &list_path, None).await?;
    let page = app.store.list(&collection, after.as_ref(), limit).await?;
    // A page ends at `limit` documents or at the byte budget (tandem_core::limits::LIST_PAGE_BYTES).
    let next = if page.more {
        page.documents
            .last()
            .map(|d| URL_SAFE_NO_PAD.encode(d.id.as_str()))
    } else {
        None
    };
    let body = serde_json::json!({ "items": page.documents, "next": next });
    Ok(axum::Json(body).into_response())
}

fn page_parameters(query: Option<&str>) -> Result<(u32, Option<DocumentId>), ApiError> {
    let bad = |detail: String| ApiError::BadRequest {
        title: "Invalid query parameter",
        detail,
    };
    let mut limit = DEFAULT_LIMIT;
    let mut after = None;
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "limit" => {
                limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        bad(format!("limit must be an integer from 1 to {MAX_LIMIT}"))
                    })?;
            }
            "after" => {
                let id = URL_SAFE_NO_PAD
                    .decode(value.as_bytes())
                    .ok()
                    .and_then(|raw| String::from_utf8(raw).ok())
                    .and_then(|id| DocumentId::parse(&id).ok())
                    .ok_or_else(|| {
                        bad("after must be a cursor returned as next by a previous page".to_owned())
                    })?;
                after = Some(id);
            }
            other => {
                return Err(bad(format!(
                    "unknown query parameter {other:?}; expected limit or after"
                )));
            }
        }
    }
    Ok((limit, after))
}

/// A read carrying `X-Consistency-Token` observes that write or a newer one, from the
/// database or the cache (a cached entry older than the token is a miss: the returned minimum
/// version). Region 1 holds every acknowledged write already; a replica waits for it, bounded.
/// The token must name the document read (`document`), or, for a list, a document of the
/// listed collection: a token for something else is a 400, not a wait.
async fn honour_consistency_token(
    app: &AppState,
    headers: &HeaderMap,
    path: &str,
    document: Option<&DocumentKey>,
) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(CONSISTENCY_TOKEN_HEADER) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| ConsistencyToken::decode(v).ok())
        .ok_or_else(|| ApiError::BadRequest {
            title: "Invalid consistency token",
            detail: "X-Consistency-Token must be a value returned by a write".to_owned(),
        })?;
    let names_this = match document {
        Some(key) => token.key == *key,
        None => path
            .strip_prefix("/v1/")
            .and_then(|rest| rest.split(['?', '/']).next())
            .is_some_and(|collection| collection == token.key.collection.as_str()),
    };
    if !names_this {
        return Err(ApiError::BadRequest {
            title: "Invalid consistency token",
            detail: format!(
                "X-Consistency-Token names {}/{}, not the resource requested",
                token.key.collection, token.key.id
            ),
        });
    }
    match app.active_replica() {
        Some(replica) => replica
            .await_token(&app.store, &token, path)
            .await
            .map_err(|e| match e {
                TokenWait::Lagging { primary_read_url } => ApiError::Lagging {
                    primary_read_url: Some(primary_read_url),
                    retry_after_seconds: 1,
                },
                TokenWait::Store(e) => e.into(),
            })?,
        // The primary holds every acknowledged write: a token past its version was not
        // issued for this database's history.
        None => {
            let current = app.store.version(&token.key).await?;
            if let Some(replica) = app
                .replica
                .as_ref()
                .filter(|_| current.is_none_or(|v| v < token.version))
            {
                // Believed primary, but the write region may have moved within the last
                // second (the role is re-read each second): wait as a replica would.
                replica
                    .await_token(&app.store, &token, path)
                    .await
                    .map_err(|e| match e {
                        TokenWait::Lagging { primary_read_url } => ApiError::Lagging {
                            primary_read_url: Some(primary_read_url),
                            retry_after_seconds: 1,
                        },
                        TokenWait::Store(e) => e.into(),
                    })?;
            } else if current.is_none_or(|v| v < token.version) {
                return Err(ApiError::BadRequest {
                    title: "Invalid consistency token",
                    detail: format!(
                        "X-Consistency-Token names version {} of {}/{}, which this region never wrote",
                        token.version, token.key.collection, token.key.id
                    ),
                });
            }
        }
    }
    Ok(Some(token.version))
}

/// Replicas report their replication lag on every API response.
async fn report_lag(
    State(app): State<RouterState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    if let Some(replica) = app.active_replica() {
        if let Some(lag) = replica.lag_ms() {
            response.headers_mut().insert(
                HeaderName::from_static(REPLICATION_LAG_HEADER),
                HeaderValue::from(lag),
            );
        }
    }
    response
}
