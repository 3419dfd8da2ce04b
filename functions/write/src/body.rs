//! Request bodies: content-type check, size limit and JSON-object parsing, each failure mapped
//! to its own problem.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde_json::{Map, Value};
use tandem_core::limits::{MAX_JSON_DEPTH, json_depth};
use tandem_http::problem::ApiError;

pub use tandem_core::limits::MAX_BODY_BYTES;

pub const JSON: &str = "application/json";
pub const MERGE_PATCH_JSON: &str = "application/merge-patch+json";

/// Checks the media type (parameters such as `charset` are ignored).
pub fn require_content_type(headers: &HeaderMap, expected: &'static str) -> Result<(), ApiError> {
    let actual = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if actual.as_deref() == Some(expected) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType { expected })
    }
}

/// Reads the body, refusing more than [`MAX_BODY_BYTES`].
pub async fn read_limited(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        })
}

/// Parses a JSON object that PostgreSQL can store and every parser on the replication path
/// can read: nested at most [`MAX_JSON_DEPTH`] levels, no NUL characters.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => {
            let value = Value::Object(map);
            if json_depth(&value) > MAX_JSON_DEPTH {
                return Err(ApiError::TooDeep {
                    limit: MAX_JSON_DEPTH,
                });
            }
            if contains_nul(&value) {
                return Err(ApiError::UnstorableValue(
                    "strings and keys must not contain U+0000 (PostgreSQL jsonb cannot store it)"
                        .to_owned(),
                ));
            }
            match value {
                Value::Object(map) => Ok(map),
                _ => Err(ApiError::NotAnObject),
            }
        }
        Ok(_) => Err(ApiError::NotAnObject),
        // Deeper than serde_json's own limit (128): certainly past ours.
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => Err(ApiError::TooDeep {
            limit: MAX_JSON_DEPTH,
        }),
        Err(e) => Err(ApiError::MalformedJson(e.to_string())),
    }
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}
