//! Every size and depth limit on the write path, in one place, so that whatever the Write API
//! accepts the relay can publish and Region 2 can apply.
//!
//! The chain a document travels, and the limit that holds at each step:
//!
//! | step | what bounds it |
//! |---|---|
//! | request body | [`MAX_BODY_BYTES`] (413 `payload-too-large`) |
//! | JSON nesting | [`MAX_JSON_DEPTH`] levels in the client's document (422 `too-deep`); the outbox payload adds one level and the Kafka envelope another, so the deepest JSON any parser on the path sees is `MAX_JSON_DEPTH + 2` = 66 levels, about half of serde_json's recursion limit (128) |
//! | stored document | [`MAX_DOCUMENT_BYTES`] of JSON text *as PostgreSQL renders it* (`octet_length(data::text)`, numbers written out in full: `1e300` is 301 bytes there). Enforced by the database itself (`documents_data_size`), so a `PATCH` whose merge grows the document past it is refused too (413 `document-too-large`) |
//! | Kafka message | [`MAX_EVENT_BYTES`]: the stored document plus the envelope ([`MAX_ENVELOPE_BYTES`]); the producer's `message.max.bytes`, the topic's `max.message.bytes` and MSK's broker setting are [`KAFKA_MAX_MESSAGE_BYTES`] |
//! | HTTP responses | a document response is at most its stored size plus metadata; a list page holds documents while their stored sizes add up to at most [`LIST_PAGE_BYTES`] (one document always fits); a Lambda response over the ALB's 1 MB limit ([`LAMBDA_MAX_RESPONSE_BYTES`]) becomes a 413 problem instead of a 502 |

/// The largest accepted request body (256 KiB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The deepest accepted document: objects and arrays nested at most this many levels (the
/// document object itself is level 1).
pub const MAX_JSON_DEPTH: usize = 64;

/// serde_json's recursion limit: every parser on the path (the APIs, the consumer, the
/// idempotency record) must stay below it.
pub const PARSER_DEPTH_LIMIT: usize = 128;

/// Levels the outbox payload (`{"data": document}`) and the Kafka envelope
/// (`{"data": payload}`) add around a document.
pub const ENVELOPE_DEPTH: usize = 2;

/// The largest stored document: its JSON text as PostgreSQL renders `data::text` (512 KiB).
/// Request bodies are smaller ([`MAX_BODY_BYTES`]); the room between covers PostgreSQL's
/// rendering (a space after `:` and `,`) and moderate number expansion.
pub const MAX_DOCUMENT_BYTES: usize = 512 * 1024;

/// The most an event envelope adds to a document: CloudEvents attributes, the payload's
/// metadata (collection ≤ 64, id ≤ 128 bytes, version, timestamps) and headers, with room
/// to spare.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024;

/// Kafka's limit for one record batch, set on the producer (`message.max.bytes`), on the
/// topic (`max.message.bytes`), on the consumer (`fetch.message.max.bytes`) and on MSK
/// (`terraform/modules/msk`, variable `max_message_bytes`, checked by a test).
pub const KAFKA_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The largest event the relay hands to the producer; a bigger one is dead-lettered in
/// Region 1 instead of being retried forever. Leaves room for the record batch framing.
pub const MAX_EVENT_BYTES: usize = KAFKA_MAX_MESSAGE_BYTES - 64 * 1024;

/// A list page holds documents while their stored sizes add up to at most this budget (the
/// first always fits); `next` continues. Small enough that a page stays under the ALB's Lambda
/// limit even when the Lambda transport doubles it (a body of nothing but quotes and
/// backslashes, each escaped again inside the response JSON).
pub const LIST_PAGE_BYTES: usize = 448 * 1024;

/// What an ALB accepts from a Lambda function as a whole response (1 MB, headers included).
pub const LAMBDA_MAX_RESPONSE_BYTES: usize = 1_000_000;

const _: () = {
    // The deepest wrapping is the envelope (or the idempotency record, as deep): far inside.
    assert!(2 * (MAX_JSON_DEPTH + ENVELOPE_DEPTH) <= PARSER_DEPTH_LIMIT + 4);
    assert!(MAX_BODY_BYTES <= MAX_DOCUMENT_BYTES);
    assert!(MAX_DOCUMENT_BYTES + MAX_ENVELOPE_BYTES <= MAX_EVENT_BYTES);
    assert!(MAX_EVENT_BYTES < KAFKA_MAX_MESSAGE_BYTES);
    assert!(2 * LIST_PAGE_BYTES + 64 * 1024 < LAMBDA_MAX_RESPONSE_BYTES);
};

/// The nesting depth of a JSON value: 0 for a scalar, 1 for a flat object or array.
pub fn json_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    // Iterative, so that no input can exhaust the stack here.
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((value, level)) = stack.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(level);
                stack.extend(items.iter().map(|v| (v, level + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(level);
                stack.extend(map.values().map(|v| (v, level + 1)));
            }
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_containers() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}]})), 4);
    }

    #[test]
    fn the_deepest_accepted_document_parses_inside_its_envelope() {
        let mut text = "1".to_owned();
        for _ in 0..MAX_JSON_DEPTH + ENVELOPE_DEPTH {
            text = format!("{{\"data\":{text}}}");
        }
        let value: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(json_depth(&value), MAX_JSON_DEPTH + ENVELOPE_DEPTH);
    }

    #[test]
    fn msk_is_configured_with_the_same_message_limit() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../terraform/modules/msk/variables.tf"
        );
        let text = std::fs::read_to_string(path).expect("the MSK module's variables");
        let block = text
            .split("variable \"max_message_bytes\"")
            .nth(1)
            .expect("variable max_message_bytes");
        let default = block
            .lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix("default"))
            .and_then(|rest| rest.trim().strip_prefix('='))
            .map(str::trim)
            .expect("a default");
        assert_eq!(default, KAFKA_MAX_MESSAGE_BYTES.to_string());
        // No deployment overrides it.
        let deployments = concat!(env!("CARGO_MANIFEST_DIR"), "/../../terraform/deployments");
        for entry in std::fs::read_dir(deployments)
            .expect("deployments")
            .flatten()
        {
            for file in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(file.path()).unwrap_or_default();
                assert!(
                    !text.contains("max_message_bytes ="),
                    "{} overrides max_message_bytes",
                    file.path().display()
                );
            }
        }
    }
}
