//! Handlers: extract and validate, call the store, map the outcome to a response.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::FutureExt;
use tandem_core::consistency::ConsistencyToken;
use tandem_core::document::{DocumentId, DocumentKey, Preconditions};
use tandem_core::write::{Idempotency, WriteCommand, WriteOutcome, WriteRequest, WriteResult};
use tandem_http::auth::Principal;
use tandem_http::extract::{CollectionPath, DocumentPath, RequestPreconditions, Trace, Writer};
use tandem_http::http::{
    CONSISTENCY_TOKEN_HEADER, FORWARDED_FROM_HEADER, IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENT_REPLAYED_HEADER, Readiness, ReadyCheck, document_path, etag, finish, ops_router,
    pool_scrape_hook,
};
use tandem_http::problem::ApiError;
use tandem_store::cache::{CacheError, Entry};
use tracing::Instrument;

use crate::body::{JSON, MERGE_PATCH_JSON, parse_object, read_limited, require_content_type};
use crate::forward::Incoming;
use crate::{AppState, RouterState};

/// The complete Write API.
pub fn router(state: AppState) -> Router {
    let state = RouterState::new(state);
    let metrics = state.metrics.clone();
    let region = state.region.clone();
    let timeout = state.request_timeout;
    let ready: ReadyCheck = {
        let state = state.clone();
        Arc::new(move || {
            let state = state.clone();
            async move { Readiness::of_store_and_cache(&state.store, &state.cache).await }.boxed()
        })
    };
    let on_scrape = pool_scrape_hook(state.store.pool().clone());
    let api = Router::new()
        .route("/leader", get(leader))
        .route("/v1/{collection}", post(create_document))
        .route(
            "/v1/{collection}/{id}",
            put(put_document)
                .patch(patch_document)
                .delete(delete_document),
        )
        .with_state(state);
    finish(
        api.merge(ops_router(metrics.clone(), ready, on_scrape)),
        metrics,
        &region,
        timeout,
    )
}

async fn put_document(
    State(app): State<RouterState>,
    Writer(principal): Writer,
    DocumentPath(key): DocumentPath,
    RequestPreconditions(preconditions): RequestPreconditions,
    Trace(traceparent): Trace,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_content_type(&headers, JSON)?;
    let bytes = read_limited(body).await?;
    let data = parse_object(&bytes)?;
    let path = document_path(&key);
    let request = WriteRequest {
        idempotency: idempotency(&headers, &principal, &Method::PUT, &path, &bytes)?,
        key,
        command: WriteCommand::Put(data),
        preconditions,
        traceparent,
    };
    let incoming = Incoming {
        method: Method::PUT,
        path: &path,
        headers: &headers,
        body: bytes,
    };
    execute(&app, request, incoming).await
}

async fn create_document(
    State(app): State<RouterState>,
    Writer(principal): Writer,
    CollectionPath(collection): CollectionPath,
    Trace(traceparent): Trace,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_content_type(&headers, JSON)?;
    let bytes = read_limited(body).await?;
    let data = parse_object(&bytes)?;
    let path = format!("/v1/{collection}");
    let request = WriteRequest {
        idempotency: idempotency(&headers, &principal, &Method::POST, &path, &bytes)?,
        key: DocumentKey::new(collection, DocumentId::generate()),
        command: WriteCommand::Create(data),
        preconditions: Preconditions::default(),
        traceparent,
    };
    let incoming = Incoming {
        method: Method::POST,
        path: &path,
        headers: &headers,
        body: bytes,
    };
    execute(&app, request, incoming).await
}

async fn patch_document(
    State(app): State<RouterState>,
    Writer(principal): Writer,
    DocumentPath(key): DocumentPath,
    RequestPreconditions(preconditions): RequestPreconditions,
    Trace(traceparent): Trace,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_content_type(&headers, MERGE_PATCH_JSON)?;
    let bytes = read_limited(body).await?;
    // A merge patch that is not an object would replace the whole document with a non-object.
    let patch = parse_object(&bytes)?;
    let path = document_path(&key);
    let request = WriteRequest {
        idempotency: idempotency(&headers, &principal, &Method::PATCH, &path, &bytes)?,
        key,
        command: WriteCommand::Patch(patch),
        preconditions,
        traceparent,
    };
    let incoming = Incoming {
        method: Method::PATCH,
        path: &path,
        headers: &headers,
        body: bytes,
    };
    execute(&app, request, incoming).await
}

async fn delete_document(
    State(app): State<RouterState>,
    Writer(principal): Writer,
    DocumentPath(key): DocumentPath,
    RequestPreconditions(preconditions): RequestPreconditions,
    Trace(traceparent): Trace,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let path = document_path(&key);
    let request = WriteRequest {
        idempotency: idempotency(&headers, &principal, &Method::DELETE, &path, &[])?,
        key,
        command: WriteCommand::Delete,
        preconditions,
        traceparent,
    };
    let incoming = Incoming {
        method: Method::DELETE,
        path: &path,
        headers: &headers,
        body: Bytes::new(),
    };
    execute(&app, request, incoming).await
}

/// Sends the write to the write region when this region is not it (as its database last said,
/// or as its database answers the write), else commits it here.
async fn execute(
    app: &AppState,
    request: WriteRequest,
    incoming: Incoming<'_>,
) -> Result<Response, ApiError> {
    // A write another region forwarded is decided here, whatever this region's role: it is
    // never sent on (no loop while the regions' roles disagree).
    let forwarder = app
        .forwarder
        .as_ref()
        .filter(|_| !incoming.headers.contains_key(FORWARDED_FROM_HEADER));
    let Some(forwarder) = forwarder else {
        return commit(app, request).await;
    };
    if app
        .role
        .get(&app.store)
        .await
        .is_some_and(|role| role.write_region != role.region)
    {
        return forwarder.forward(incoming).await;
    }
    match commit(app, request).await {
        // The role changed since it was read: another region writes now.
        Err(ApiError::NotWriteRegion { write_region, .. }) if write_region != app.region => {
            app.role.invalidate();
            forwarder.forward(incoming).await
        }
        other => other,
    }
}

/// `GET /leader`: 200 while this region is the write region and its writes are not fenced,
/// 503 otherwise, with the role as the database records it (a Route 53 health check keeps the
/// write record on the region that answers 200).
async fn leader(State(app): State<RouterState>) -> Response {
    match tandem_store::roles::current(app.store.pool()).await {
        Ok(Some(role)) => {
            let status = if role.accepts_writes() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, axum::Json(role)).into_response()
        }
        Ok(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "region": app.region, "write_region": null })),
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Commits the write, refreshes the cache, and shapes the response.
async fn commit(app: &AppState, request: WriteRequest) -> Result<Response, ApiError> {
    let span = tracing::info_span!(
        "write",
        collection = %request.key.collection,
        id = %request.key.id,
        trace_id = request.traceparent.trace_id(),
    );
    let result = app.store.write(request).instrument(span).await?;
    // The document's body, serialised once for the cache and the response.
    let body = result.outcome().document.as_ref().map(|d| d.to_body());
    if matches!(result, WriteResult::Applied(_)) {
        refresh_cache(app, result.outcome(), body.clone()).await;
    }
    Ok(respond(&result, body))
}

/// Stores the committed version in Region 1's cache before acknowledging, so no reader can
/// afterwards fill an older version (the cache's version guard refuses it). A Redis failure
/// never fails the write: the cache distrusts itself and bumps its generation as soon as Redis
/// answers again, so the entry it could not update is never served (`tandem_store::cache`).
async fn refresh_cache(app: &AppState, outcome: &WriteOutcome, body: Option<Bytes>) {
    let key = DocumentKey::new(outcome.collection.clone(), outcome.id.clone());
    let entry = match body {
        Some(body) => Entry::Live {
            version: outcome.version,
            body,
        },
        None => Entry::Deleted {
            version: outcome.version,
        },
    };
    match app.cache.put(&key, &entry).await {
        Ok(_) => {}
        // Bypassed since an earlier fault: the generation bump to come covers this entry.
        Err(CacheError::Distrusted) => app.metrics.cache("write_through_skipped"),
        Err(e) => {
            app.metrics.cache("write_through_failed");
            tracing::warn!(error = %e, collection = %key.collection, id = %key.id, "cache write-through failed; the cache generation will be bumped");
        }
    }
}

/// `body` is the serialised document (`None` for a delete).
fn respond(result: &WriteResult, body: Option<Bytes>) -> Response {
    let outcome = result.outcome();
    let key = DocumentKey::new(outcome.collection.clone(), outcome.id.clone());
    let token = ConsistencyToken {
        key: key.clone(),
        version: outcome.version,
        committed_ms: i64::try_from(outcome.committed_at.unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(0),
    }
    .encode();
    let mut response = match body {
        Some(body) => {
            let status = if outcome.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut response = (status, body).into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
            if outcome.created {
                if let Ok(location) = HeaderValue::from_str(&document_path(&key)) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
            }
            response
        }
        None => tandem_http::http::empty(StatusCode::NO_CONTENT),
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&etag(outcome.version)) {
        headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&token) {
        headers.insert(HeaderName::from_static(CONSISTENCY_TOKEN_HEADER), value);
    }
    if matches!(result, WriteResult::Replayed(_)) {
        headers.insert(
            HeaderName::from_static(IDEMPOTENT_REPLAYED_HEADER),
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// Reads `Idempotency-Key` and fingerprints the request (`tandem_core::write::Idempotency`).
fn idempotency(
    headers: &HeaderMap,
    principal: &Principal,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<Option<Idempotency>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|key| Idempotency::new(&principal.subject, key, method.as_str(), path, body))
        .map(Some)
        .ok_or_else(|| ApiError::BadRequest {
            title: "Invalid Idempotency-Key",
            detail: "Idempotency-Key must be 1 to 255 visible ASCII characters".to_owned(),
        })
}
