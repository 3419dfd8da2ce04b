//! The document model: validated collection names and ids, versions, documents and the
//! representation every API returns.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

/// Why a path segment was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("collection {0:?} must match ^[a-z][a-z0-9_-]{{0,63}}$")]
    Collection(String),
    #[error("document id {0:?} must match ^[A-Za-z0-9._~-]{{1,128}}$")]
    Id(String),
}

/// A collection name: `^[a-z][a-z0-9_-]{0,63}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Collection(String);

impl Collection {
    pub fn parse(value: &str) -> Result<Self, NameError> {
        let bytes = value.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 64
            && bytes[0].is_ascii_lowercase()
            && bytes[1..]
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(NameError::Collection(value.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A document id: `^[A-Za-z0-9._~-]{1,128}$` (the URL-unreserved characters, so ids never need
/// escaping in a path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocumentId(String);

impl DocumentId {
    pub fn parse(value: &str) -> Result<Self, NameError> {
        let ok = (1..=128).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'));
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(NameError::Id(value.to_owned()))
        }
    }

    /// A new time-ordered id for `POST`.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }
        impl From<$t> for String {
            fn from(value: $t) -> String {
                value.0
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_newtype_impls!(Collection);
string_newtype_impls!(DocumentId);

/// A document's key: where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DocumentKey {
    pub collection: Collection,
    pub id: DocumentId,
}

impl DocumentKey {
    pub fn new(collection: Collection, id: DocumentId) -> Self {
        Self { collection, id }
    }
}

/// A document as stored and served. `version` starts at 1 and grows by one per write,
/// deletes included; it is the document's `ETag`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub collection: Collection,
    pub id: DocumentId,
    pub version: i64,
    pub data: Map<String, Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Document {
    pub fn key(&self) -> DocumentKey {
        DocumentKey::new(self.collection.clone(), self.id.clone())
    }

    /// The exact response body served for this document (also what the cache stores).
    pub fn to_body(&self) -> bytes::Bytes {
        // Serialising a map of JSON values with string keys cannot fail.
        serde_json::to_vec(self)
            .map(bytes::Bytes::from)
            .unwrap_or_default()
    }
}

/// A stored document, live or deleted.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    Live(Document),
    /// A tombstone: kept so that the version continues and old events cannot resurrect it.
    Deleted {
        version: i64,
    },
}

impl Stored {
    pub fn version(&self) -> i64 {
        match self {
            Self::Live(d) => d.version,
            Self::Deleted { version } => *version,
        }
    }
}

/// A condition on the current version, as `If-Match` / `If-None-Match` state it (their header
/// syntax is parsed on the HTTP side: `tandem_http::http::parse_entity_tags`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityTagCondition {
    /// `*`: any current representation.
    Any,
    /// A list of versions (`"3", W/"4"` — weak tags compare by value, as `If-None-Match` requires).
    Versions(Vec<i64>),
}

impl EntityTagCondition {
    /// Whether the condition matches a current version (`None`: no current representation).
    pub fn matches(&self, current: Option<i64>) -> bool {
        match (self, current) {
            (_, None) => false,
            (Self::Any, Some(_)) => true,
            (Self::Versions(list), Some(v)) => list.contains(&v),
        }
    }
}

/// Preconditions on a write, from `If-Match` and `If-None-Match`.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub if_match: Option<EntityTagCondition>,
    pub if_none_match: Option<EntityTagCondition>,
}

impl Preconditions {
    /// Evaluates against the current live version (`None` when absent or deleted), following
    /// RFC 9110 §13.2.2: `If-Match` first, then `If-None-Match`.
    pub fn hold(&self, current: Option<i64>) -> bool {
        if let Some(cond) = &self.if_match {
            if !cond.matches(current) {
                return false;
            }
        }
        if let Some(cond) = &self.if_none_match {
            if cond.matches(current) {
                return false;
            }
        }
        true
    }
}

/// Applies an RFC 7396 JSON merge patch to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch_map) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(target_map) = target {
                for (key, value) in patch_map {
                    if value.is_null() {
                        target_map.remove(key);
                    } else {
                        merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn collection_names_follow_the_contract() {
        for ok in ["a", "orders", "a-b_c9", &format!("a{}", "b".repeat(63))] {
            assert!(Collection::parse(ok).is_ok(), "{ok} rejected");
        }
        for bad in [
            "",
            "A",
            "9a",
            "-a",
            "a b",
            "a/b",
            "é",
            &format!("a{}", "b".repeat(64)),
        ] {
            assert!(Collection::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ids_follow_the_contract() {
        for ok in ["a", "A.b_c~d-9", &"x".repeat(128)] {
            assert!(DocumentId::parse(ok).is_ok(), "{ok} rejected");
        }
        for bad in ["", "a b", "a/b", "a%20", "a+b", &"x".repeat(129)] {
            assert!(DocumentId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7396_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (mut target, patch, expected) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, expected);
        }
    }

    #[test]
    fn preconditions_follow_rfc_9110() {
        use EntityTagCondition::{Any, Versions};
        let m = |c: EntityTagCondition| Preconditions {
            if_match: Some(c),
            if_none_match: None,
        };
        let n = |c: EntityTagCondition| Preconditions {
            if_match: None,
            if_none_match: Some(c),
        };
        assert!(m(Versions(vec![3])).hold(Some(3)));
        assert!(!m(Versions(vec![3])).hold(Some(4)));
        assert!(m(Versions(vec![1, 4])).hold(Some(4)));
        assert!(!m(Versions(vec![3])).hold(None));
        assert!(m(Any).hold(Some(1)));
        assert!(!m(Any).hold(None));
        assert!(!m(Versions(vec![])).hold(Some(1)));
        assert!(n(Any).hold(None));
        assert!(!n(Any).hold(Some(1)));
        assert!(!n(Versions(vec![2])).hold(Some(2)));
        assert!(n(Versions(vec![2])).hold(Some(3)));
        assert!(Preconditions::default().hold(None));
    }
}
