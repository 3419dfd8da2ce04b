//! Consistency tokens: what a Region 1 write returns in `X-Consistency-Token` so that a later
//! read in Region 2 can insist on observing that write (read-your-writes across regions).
//!
//! A token encodes the written document's collection, id and version, plus the commit time in
//! Unix milliseconds: `base64url("t1:{collection}:{id}:{version}:{committed_ms}")`. Collection
//! names and ids cannot contain `:`, so the encoding is unambiguous. Clients must treat tokens as
//! opaque; the `t1` prefix versions the format.
//!
//! A Region 2 read that carries a token is served only once Region 2 holds that document at
//! `version` or newer (tombstones included); a list of the token's collection likewise waits for
//! it. Tokens are not signed: forging one can only make a read wait (bounded) or be refused, never
//! return data the caller could not read anyway.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::document::{Collection, DocumentId, DocumentKey};

/// A decoded consistency token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyToken {
    pub key: DocumentKey,
    pub version: i64,
    pub committed_ms: i64,
}

/// The token is not one this service issued.
#[derive(Debug, thiserror::Error)]
#[error("malformed consistency token")]
pub struct MalformedToken;

impl ConsistencyToken {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "t1:{}:{}:{}:{}",
            self.key.collection, self.key.id, self.version, self.committed_ms
        ))
    }

    pub fn decode(token: &str) -> Result<Self, MalformedToken> {
        let raw = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| MalformedToken)?;
        let text = std::str::from_utf8(&raw).map_err(|_| MalformedToken)?;
        let parts: Vec<&str> = text.split(':').collect();
        let ["t1", collection, id, version, committed_ms] = parts.as_slice() else {
            return Err(MalformedToken);
        };
        Ok(Self {
            key: DocumentKey::new(
                Collection::parse(collection).map_err(|_| MalformedToken)?,
                DocumentId::parse(id).map_err(|_| MalformedToken)?,
            ),
            version: version.parse().map_err(|_| MalformedToken)?,
            committed_ms: committed_ms.parse().map_err(|_| MalformedToken)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_rejected() {
        let token = ConsistencyToken {
            key: DocumentKey::new(
                Collection::parse("orders").expect("valid"),
                DocumentId::parse("a.b~c").expect("valid"),
            ),
            version: 42,
            committed_ms: 1_700_000_000_123,
        };
        assert_eq!(ConsistencyToken::decode(&token.encode()).ok(), Some(token));
        for bad in ["", "!!", "dDE6b3JkZXJz", "dDI6YTpiOjE6Mg"] {
            assert!(ConsistencyToken::decode(bad).is_err(), "{bad} accepted");
        }
    }
}
