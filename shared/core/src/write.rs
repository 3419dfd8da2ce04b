//! A write as the Write API hands it to the store, its outcome, and the rules that decide
//! what it does to a document ([`plan_creation`], [`plan_change`]): pure functions of the
//! request and the current row, which the store then writes (with the outbox row) in one
//! transaction.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::document::{Collection, Document, DocumentId, DocumentKey, Preconditions, merge_patch};
use crate::limits::{MAX_JSON_DEPTH, json_depth};
use crate::traceparent::TraceParent;

/// What a write does to a document.
#[derive(Debug, Clone)]
pub enum WriteCommand {
    /// Create or replace (`PUT`).
    Put(Map<String, Value>),
    /// Create under the given, freshly generated id (`POST`).
    Create(Map<String, Value>),
    /// RFC 7396 merge patch of a live document (`PATCH`).
    Patch(Map<String, Value>),
    /// Replace with a tombstone (`DELETE`).
    Delete,
}

/// A client's `Idempotency-Key`, scoped to the principal that sent it.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub principal: String,
    pub key: String,
    /// SHA-256 over method, path and body.
    pub fingerprint: [u8; 32],
}

impl Idempotency {
    /// The longest `Idempotency-Key` accepted.
    pub const MAX_KEY_LEN: usize = 255;

    /// An idempotency record for `key` (1 to 255 visible ASCII characters, spaces allowed;
    /// `None` otherwise), fingerprinting the request: its method, its path and its body, the
    /// body canonicalised when it is JSON (a retry that differs only in whitespace or key order
    /// is the same request).
    pub fn new(principal: &str, key: &str, method: &str, path: &str, body: &[u8]) -> Option<Self> {
        let valid = (1..=Self::MAX_KEY_LEN).contains(&key.len())
            && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if !valid {
            return None;
        }
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(method.as_bytes());
        hasher.update(b"\n");
        hasher.update(path.as_bytes());
        hasher.update(b"\n");
        hasher.update(canonical_body(body));
        Some(Self {
            principal: principal.to_owned(),
            key: key.to_owned(),
            fingerprint: hasher.finalize().into(),
        })
    }
}

/// The body as compared for idempotency: parsed and re-serialised with sorted keys when it is
/// JSON, else as it is.
fn canonical_body(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => serde_json::to_vec(&sort_keys(value)).unwrap_or_else(|_| body.to_vec()),
        Err(_) => body.to_vec(),
    }
}

fn sort_keys(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// One write, as the Write API hands it to the store.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub key: DocumentKey,
    pub command: WriteCommand,
    pub preconditions: Preconditions,
    pub traceparent: TraceParent,
    pub idempotency: Option<Idempotency>,
}

/// The committed result of a write; also what an idempotent retry replays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub collection: Collection,
    pub id: DocumentId,
    pub version: i64,
    /// The document did not exist (or was deleted) before this write.
    pub created: bool,
    /// The document after the write; `None` when the write was a delete.
    pub document: Option<Document>,
    /// The id of the outbox event this write produced.
    pub event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub committed_at: OffsetDateTime,
}

/// A write either happened now or had already happened under the same idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResult {
    Applied(WriteOutcome),
    Replayed(WriteOutcome),
}

impl WriteResult {
    pub fn outcome(&self) -> &WriteOutcome {
        match self {
            Self::Applied(o) | Self::Replayed(o) => o,
        }
    }
}

/// Why the rules refuse a write (the store adds its own failures to these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    PreconditionFailed {
        current: Option<i64>,
    },
    /// A merge patch would nest the document deeper than [`MAX_JSON_DEPTH`].
    TooDeep,
    /// A broken invariant (a bug, never the client's fault).
    Invariant(&'static str),
}

/// The current row of a document, read under the write lock.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub version: i64,
    pub deleted: bool,
    /// Loaded only when the write needs it (a merge patch).
    pub data: Option<Map<String, Value>>,
}

impl Current {
    fn live_version(&self) -> Option<i64> {
        (!self.deleted).then_some(self.version)
    }
}

/// What a write does to a document's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub version: i64,
    /// There was no live document: this write creates it (again).
    pub recreated: bool,
    /// `None` for a delete.
    pub data: Option<Map<String, Value>>,
}

impl Change {
    /// The outbox row's `operation`.
    pub fn operation(&self) -> &'static str {
        if self.data.is_some() {
            "upsert"
        } else {
            "delete"
        }
    }

    /// The outcome, once the row is written with these times.
    pub fn outcome(
        self,
        key: &DocumentKey,
        event_id: Uuid,
        created_at: OffsetDateTime,
        updated_at: OffsetDateTime,
    ) -> WriteOutcome {
        WriteOutcome {
            collection: key.collection.clone(),
            id: key.id.clone(),
            version: self.version,
            created: self.recreated,
            document: self.data.map(|data| Document {
                collection: key.collection.clone(),
                id: key.id.clone(),
                version: self.version,
                data,
                created_at,
                updated_at,
            }),
            event_id,
            committed_at: updated_at,
        }
    }
}

/// Decides whether a write may create its (absent) document as version 1.
pub fn plan_creation(request: &WriteRequest) -> Result<Change, Refusal> {
    let data = match &request.command {
        WriteCommand::Put(data) | WriteCommand::Create(data) => data,
        WriteCommand::Patch(_) | WriteCommand::Delete => return Err(Refusal::NotFound),
    };
    if !request.preconditions.hold(None) {
        return Err(Refusal::PreconditionFailed { current: None });
    }
    Ok(Change {
        version: 1,
        recreated: true,
        data: Some(data.clone()),
    })
}

/// Decides what a write does to the existing row `current` (locked by the caller), or why it
/// is refused.
pub fn plan_change(request: &WriteRequest, current: &Current) -> Result<Change, Refusal> {
    let live = current.live_version();
    if matches!(request.command, WriteCommand::Create(_)) {
        // A generated UUIDv7 never collides; if it did, refuse rather than overwrite.
        return Err(Refusal::Invariant("generated id already exists"));
    }
    if live.is_none()
        && matches!(
            request.command,
            WriteCommand::Patch(_) | WriteCommand::Delete
        )
    {
        return Err(Refusal::NotFound);
    }
    if !request.preconditions.hold(live) {
        return Err(Refusal::PreconditionFailed { current: live });
    }
    let data = match &request.command {
        WriteCommand::Put(data) | WriteCommand::Create(data) => Some(data.clone()),
        WriteCommand::Patch(patch) => {
            let mut target = Value::Object(current.data.clone().unwrap_or_default());
            merge_patch(&mut target, &Value::Object(patch.clone()));
            if json_depth(&target) > MAX_JSON_DEPTH {
                return Err(Refusal::TooDeep);
            }
            match target {
                Value::Object(map) => Some(map),
                _ => return Err(Refusal::Invariant("merge patch produced a non-object")),
            }
        }
        WriteCommand::Delete => None,
    };
    Ok(Change {
        version: current.version + 1,
        recreated: live.is_none(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_key_is_1_to_255_visible_ascii_characters() {
        let make = |key: &str| Idempotency::new("p", key, "PUT", "/v1/c/d", b"{}");
        assert!(make("a").is_some());
        assert!(make("order 42").is_some());
        assert!(make(&"k".repeat(255)).is_some());
        assert!(make("").is_none());
        assert!(make(&"k".repeat(256)).is_none());
        assert!(make("tab\there").is_none());
        assert!(make("é").is_none());
    }

    #[test]
    fn the_fingerprint_ignores_json_layout_but_not_content_method_or_path() {
        let print = |method: &str, path: &str, body: &[u8]| {
            Idempotency::new("p", "k", method, path, body)
                .map(|i| i.fingerprint)
                .unwrap_or_default()
        };
        let base = print("PUT", "/v1/c/d", br#"{"a":1,"b":[1,{"y":2,"x":1}]}"#);
        assert_eq!(
            base,
            print("PUT", "/v1/c/d", br#"{ "b": [1, {"x":1, "y":2}], "a": 1 }"#)
        );
        assert_ne!(
            base,
            print("PUT", "/v1/c/d", br#"{"a":2,"b":[1,{"y":2,"x":1}]}"#)
        );
        assert_ne!(
            base,
            print("PATCH", "/v1/c/d", br#"{"a":1,"b":[1,{"y":2,"x":1}]}"#)
        );
        assert_ne!(
            base,
            print("PUT", "/v1/c/e", br#"{"a":1,"b":[1,{"y":2,"x":1}]}"#)
        );
        // Not JSON: compared byte for byte.
        assert_ne!(
            print("PUT", "/v1/c/d", b"x "),
            print("PUT", "/v1/c/d", b"x")
        );
    }
    use crate::document::EntityTagCondition;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn request(command: WriteCommand, if_match: Option<EntityTagCondition>) -> WriteRequest {
        WriteRequest {
            key: DocumentKey::new(
                Collection::parse("orders").expect("valid"),
                DocumentId::parse("o1").expect("valid"),
            ),
            command,
            preconditions: Preconditions {
                if_match,
                if_none_match: None,
            },
            traceparent: TraceParent::generate(),
            idempotency: None,
        }
    }

    fn live(version: i64, data: Value) -> Current {
        Current {
            version,
            deleted: false,
            data: Some(object(data)),
        }
    }

    #[test]
    fn an_absent_document_is_created_by_put_only() {
        let put = request(WriteCommand::Put(object(json!({"a": 1}))), None);
        let change = plan_creation(&put).expect("created");
        assert_eq!((change.version, change.recreated), (1, true));
        assert_eq!(change.operation(), "upsert");
        for command in [WriteCommand::Patch(Map::new()), WriteCommand::Delete] {
            assert_eq!(
                plan_creation(&request(command, None)),
                Err(Refusal::NotFound)
            );
        }
        let guarded = request(WriteCommand::Put(Map::new()), Some(EntityTagCondition::Any));
        assert_eq!(
            plan_creation(&guarded),
            Err(Refusal::PreconditionFailed { current: None })
        );
    }

    #[test]
    fn changes_follow_the_current_row() {
        let patch = request(
            WriteCommand::Patch(object(json!({"b": 2, "a": null}))),
            None,
        );
        let change = plan_change(&patch, &live(3, json!({"a": 1}))).expect("patched");
        assert_eq!(change.version, 4);
        assert!(!change.recreated);
        assert_eq!(change.data, Some(object(json!({"b": 2}))));

        let delete = request(WriteCommand::Delete, None);
        let change = plan_change(&delete, &live(3, json!({}))).expect("deleted");
        assert_eq!(change.operation(), "delete");
        assert_eq!((change.version, change.data), (4, None));

        let tombstone = Current {
            version: 4,
            deleted: true,
            data: None,
        };
        assert_eq!(plan_change(&delete, &tombstone), Err(Refusal::NotFound));
        let put = request(WriteCommand::Put(Map::new()), None);
        let change = plan_change(&put, &tombstone).expect("recreated");
        assert_eq!((change.version, change.recreated), (5, true));

        let stale = request(
            WriteCommand::Put(Map::new()),
            Some(EntityTagCondition::Versions(vec![2])),
        );
        assert_eq!(
            plan_change(&stale, &live(3, json!({}))),
            Err(Refusal::PreconditionFailed { current: Some(3) })
        );
        let create = request(WriteCommand::Create(Map::new()), None);
        assert!(matches!(
            plan_change(&create, &live(1, json!({}))),
            Err(Refusal::Invariant(_))
        ));
    }

    #[test]
    fn a_patch_may_not_nest_past_the_limit() {
        let mut deep = json!(1);
        for _ in 0..=MAX_JSON_DEPTH {
            deep = json!({ "x": deep });
        }
        let patch = request(WriteCommand::Patch(object(deep)), None);
        assert_eq!(
            plan_change(&patch, &live(1, json!({}))),
            Err(Refusal::TooDeep)
        );
    }
}
