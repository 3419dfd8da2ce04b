//! The one place where failures become HTTP responses: RFC 9457 `application/problem+json`.
//!
//! Client errors carry a useful `detail`; server errors carry a generic one and their cause
//! chain is logged here, once. Nothing internal (SQL, stack traces, driver messages) reaches a
//! response body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use tandem_core::document::NameError;
use tandem_store::documents::{StoreError, WriteError};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECONDS: u32 = 1;

/// Every error an HTTP handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the body must be a JSON object")]
    NotAnObject,
    #[error("{0}")]
    UnstorableValue(String),
    #[error("the request content type must be {expected}")]
    UnsupportedMediaType { expected: &'static str },
    #[error("the request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the document nests objects and arrays deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error(
        "the document as stored would exceed {limit} bytes (its JSON text as PostgreSQL stores it, with numbers written out in full)"
    )]
    DocumentTooLarge { limit: usize },
    #[error("the response would exceed {limit} bytes, more than the Lambda transport carries")]
    ResponseTooLarge { limit: usize },
    #[error("{detail}")]
    BadRequest { title: &'static str, detail: String },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no document at this path")]
    NotFound,
    #[error("the route does not exist")]
    NoRoute,
    #[error("the method is not allowed on this resource")]
    MethodNotAllowed,
    #[error("precondition failed")]
    PreconditionFailed { current: Option<i64> },
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("{dependency} is unavailable")]
    Unavailable {
        dependency: &'static str,
        #[source]
        source: Option<anyhow::Error>,
    },
    /// The request ran longer than `TANDEM_REQUEST_TIMEOUT_MS`.
    #[error("the request did not complete within {after_ms} ms")]
    Timeout { after_ms: u128 },
    /// Region 2 could not show a write the client has seen; read it from Region 1 instead.
    #[error("this region has not yet replicated the requested write")]
    Lagging {
        primary_read_url: Option<String>,
        retry_after_seconds: u32,
    },
    /// This region is not the write region, or its writes are fenced for a switchover.
    #[error("{message}")]
    NotWriteRegion {
        message: String,
        write_region: String,
        write_epoch: i64,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(source) => Self::Unavailable {
                dependency: "the database",
                source: Some(source),
            },
            StoreError::Internal(source) => Self::Internal(source),
            fenced @ StoreError::Fenced { .. } => Self::Internal(fenced.into()),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NotFound => Self::NotFound,
            WriteError::PreconditionFailed { current } => Self::PreconditionFailed { current },
            WriteError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            WriteError::DocumentTooLarge => Self::DocumentTooLarge {
                limit: tandem_core::limits::MAX_DOCUMENT_BYTES,
            },
            WriteError::TooDeep => Self::TooDeep {
                limit: tandem_core::limits::MAX_JSON_DEPTH,
            },
            WriteError::NotWritable {
                message,
                write_region,
                write_epoch,
            } => Self::NotWriteRegion {
                message,
                write_region,
                write_epoch,
            },
            WriteError::Store(e) => e.into(),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_read_url: Option<&'a str>,
    /// `not-write-region`: the write region, and its write epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    write_region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    write_epoch: Option<i64>,
}

impl ApiError {
    /// Status, problem type slug and title.
    fn describe(&self) -> (StatusCode, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            Self::InvalidName(_) => (S::BAD_REQUEST, "invalid-path", "Invalid collection or id"),
            Self::MalformedJson(_) => (S::BAD_REQUEST, "malformed-json", "Malformed JSON"),
            Self::NotAnObject => (
                S::UNPROCESSABLE_ENTITY,
                "not-an-object",
                "Body is not a JSON object",
            ),
            Self::UnstorableValue(_) => (
                S::UNPROCESSABLE_ENTITY,
                "unstorable-value",
                "Value cannot be stored",
            ),
            Self::UnsupportedMediaType { .. } => (
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            Self::PayloadTooLarge { .. } => (
                S::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            Self::TooDeep { .. } => (
                S::UNPROCESSABLE_ENTITY,
                "too-deep",
                "Document nested too deeply",
            ),
            Self::DocumentTooLarge { .. } => (
                S::PAYLOAD_TOO_LARGE,
                "document-too-large",
                "Document too large",
            ),
            Self::ResponseTooLarge { .. } => (
                S::PAYLOAD_TOO_LARGE,
                "response-too-large",
                "Response too large",
            ),
            Self::BadRequest { title, .. } => (S::BAD_REQUEST, "bad-request", title),
            Self::Auth(AuthError::Missing | AuthError::Invalid(_)) => {
                (S::UNAUTHORIZED, "unauthorized", "Authentication required")
            }
            Self::Auth(AuthError::InsufficientScope(_)) => {
                (S::FORBIDDEN, "forbidden", "Insufficient scope")
            }
            Self::Auth(AuthError::NotConfigured) => (
                S::UNAUTHORIZED,
                "unauthorized",
                "Authentication is not configured",
            ),
            Self::Auth(AuthError::KeysUnavailable(_)) => (
                S::SERVICE_UNAVAILABLE,
                "dependency-unavailable",
                "Signing keys unavailable",
            ),
            Self::NotFound => (S::NOT_FOUND, "not-found", "Not found"),
            Self::NoRoute => (S::NOT_FOUND, "no-route", "Not found"),
            Self::MethodNotAllowed => (
                S::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            Self::PreconditionFailed { .. } => (
                S::PRECONDITION_FAILED,
                "precondition-failed",
                "Precondition failed",
            ),
            Self::IdempotencyKeyReused => (
                S::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
            ),
            Self::Unavailable { .. } => (
                S::SERVICE_UNAVAILABLE,
                "dependency-unavailable",
                "Service unavailable",
            ),
            Self::Timeout { .. } => (
                S::SERVICE_UNAVAILABLE,
                "request-timeout",
                "Request timed out",
            ),
            Self::Lagging { .. } => (
                S::SERVICE_UNAVAILABLE,
                "replication-lag",
                "Region is behind",
            ),
            Self::NotWriteRegion { .. } => (
                S::SERVICE_UNAVAILABLE,
                "not-write-region",
                "Region does not take writes",
            ),
            Self::Internal(_) => (
                S::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.describe();
        match &self {
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "request failed")
            }
            Self::Unavailable {
                source: Some(cause),
                dependency,
            } => {
                tracing::warn!(
                    error = format!("{cause:#}"),
                    dependency,
                    "dependency unavailable"
                );
            }
            Self::Auth(AuthError::KeysUnavailable(cause)) => {
                tracing::warn!(error = format!("{cause:#}"), "JWKS unavailable");
            }
            _ => {}
        }
        let detail = match &self {
            Self::Internal(_) => {
                "The server could not complete the request; it has been logged.".to_owned()
            }
            Self::PreconditionFailed { current: Some(v) } => {
                format!(
                    "The document's current version is {v}; the request's precondition does not hold."
                )
            }
            Self::PreconditionFailed { current: None } => {
                "The document does not exist, or exists where the request required it not to."
                    .to_owned()
            }
            Self::Unavailable { dependency, .. } => {
                format!("{dependency} is unavailable; retry shortly.")
            }
            Self::Lagging { .. } => {
                "This region has not yet applied the write named by X-Consistency-Token; \
                 retry shortly or read from the primary region."
                    .to_owned()
            }
            other => other.to_string(),
        };
        let (current_version, primary_read_url) = match &self {
            Self::PreconditionFailed { current } => (*current, None),
            Self::Lagging {
                primary_read_url, ..
            } => (None, primary_read_url.as_deref()),
            _ => (None, None),
        };
        let body = Body {
            kind: format!("/problems/{slug}"),
            title,
            status: status.as_u16(),
            detail,
            current_version,
            primary_read_url,
            write_region: match &self {
                Self::NotWriteRegion { write_region, .. } => Some(write_region.as_str()),
                _ => None,
            },
            write_epoch: match &self {
                Self::NotWriteRegion { write_epoch, .. } => Some(*write_epoch),
                _ => None,
            },
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (status, bytes).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            Self::Auth(AuthError::Missing | AuthError::NotConfigured) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Auth(AuthError::Invalid(_)) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Self::Auth(AuthError::InsufficientScope(scope)) => {
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{scope}\""
                )) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::Unavailable { .. }
            | Self::Timeout { .. }
            | Self::NotWriteRegion { .. }
            | Self::Auth(AuthError::KeysUnavailable(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            }
            Self::Lagging {
                retry_after_seconds,
                ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            _ => {}
        }
        response
    }
}
