//! The request parts every handler needs, as axum extractors, so a handler reads "extract,
//! call, map": who is calling ([`Writer`], [`Reader`]), which document or collection the path
//! names ([`DocumentPath`], [`CollectionPath`]), the preconditions and the trace context.
//! A rejection is the problem+json the API documents ([`ApiError`]); extractors run in argument
//! order, so a handler lists the caller first (401/403 before a 400 on the path).

use std::ops::Deref;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRef, FromRequestParts, Path};
use axum::http::header;
use axum::http::request::Parts;
use tandem_core::document::{Collection, DocumentId, DocumentKey, Preconditions};
use tandem_core::traceparent::TraceParent;

use crate::auth::{Authenticator, Principal, READ_SCOPE, WRITE_SCOPE};
use crate::http::parse_entity_tags;
use crate::problem::ApiError;

/// A router's state: the service's state behind one reference count, so the clone axum makes
/// for every extractor and middleware of every request is one atomic increment (a deep clone of
/// a state of a dozen handles was a tenth of the Read API's CPU per cache hit).
/// [`Writer`] and [`Reader`] find the [`Authenticator`] through `AsRef`.
pub struct Shared<T>(Arc<T>);

impl<T> Shared<T> {
    pub fn new(state: T) -> Self {
        Self(Arc::new(state))
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: AsRef<Authenticator>> FromRef<Shared<T>> for Authenticator {
    fn from_ref(state: &Shared<T>) -> Self {
        AsRef::<Authenticator>::as_ref(&*state.0).clone()
    }
}

/// A caller holding scope `tandem:write`.
#[derive(Debug)]
pub struct Writer(pub Principal);

impl<S> FromRequestParts<S> for Writer
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let auth = Authenticator::from_ref(state);
        Ok(Self(
            auth.authorize(authorization(parts), WRITE_SCOPE).await?,
        ))
    }
}

/// A caller allowed to read: anyone, unless `TANDEM_READ_REQUIRES_AUTH` asks for scope
/// `tandem:read` (then the principal is known).
#[derive(Debug)]
pub struct Reader(pub Option<Principal>);

impl<S> FromRequestParts<S> for Reader
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let auth = Authenticator::from_ref(state);
        if !auth.read_requires_auth {
            return Ok(Self(None));
        }
        Ok(Self(Some(
            auth.authorize(authorization(parts), READ_SCOPE).await?,
        )))
    }
}

fn authorization(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

fn bad_path(rejection: PathRejection) -> ApiError {
    ApiError::BadRequest {
        title: "Invalid path",
        detail: rejection.body_text(),
    }
}

/// `/v1/{collection}/{id}`, both parts valid.
#[derive(Debug)]
pub struct DocumentPath(pub DocumentKey);

impl<S: Send + Sync> FromRequestParts<S> for DocumentPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((collection, id)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(bad_path)?;
        Ok(Self(DocumentKey::new(
            Collection::parse(&collection)?,
            DocumentId::parse(&id)?,
        )))
    }
}

/// `/v1/{collection}`, the collection valid.
#[derive(Debug)]
pub struct CollectionPath(pub Collection);

impl<S: Send + Sync> FromRequestParts<S> for CollectionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(collection) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(bad_path)?;
        Ok(Self(Collection::parse(&collection)?))
    }
}

/// `If-Match` and `If-None-Match`, as entity-tag conditions.
#[derive(Debug)]
pub struct RequestPreconditions(pub Preconditions);

impl<S: Send + Sync> FromRequestParts<S> for RequestPreconditions {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let parse = |name: header::HeaderName| {
            parts
                .headers
                .get(name)
                .map(|v| parse_entity_tags(v.to_str().unwrap_or("")))
        };
        Ok(Self(Preconditions {
            if_match: parse(header::IF_MATCH),
            if_none_match: parse(header::IF_NONE_MATCH),
        }))
    }
}

/// The W3C trace context a write records: the request span's own when spans are exported
/// (`crate::http::RequestTrace`: the trace continues from this request), else the client's,
/// else a new one (when the client sent none, or an invalid one).
#[derive(Debug)]
pub struct Trace(pub TraceParent);

impl<S: Send + Sync> FromRequestParts<S> for Trace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if let Some(own) = parts.extensions.get::<crate::http::RequestTrace>() {
            return Ok(Self(own.0.clone()));
        }
        Ok(Self(
            parts
                .headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(TraceParent::parse)
                .unwrap_or_else(TraceParent::generate),
        ))
    }
}
