//! Tandem's domain, with no I/O: what a document is, what a write may do to it, the change
//! event that carries it from Region 1 to Region 2 (body and Kafka headers), consistency
//! tokens, trace context and every size limit on the way.
//!
//! # Layout
//!
//! The lowest layer of the workspace. It may depend on plain data crates only (serde,
//! serde_json, time, uuid, base64, bytes, rand, sha2, thiserror) and on no other Tandem crate.
//! No database, cache, Kafka, HTTP, async runtime or cloud SDK crate (`tokio`,
//! `tokio-postgres`, `deadpool-postgres`, `redis`, `rdkafka`, `axum`, `lambda_http`,
//! `lambda_runtime`, `reqwest`, `aws-*`, `refinery`): `scripts/check-layers.py` (run by
//! `make lint` and `make test`) fails if one appears. Every other crate may depend on this
//! one; HTTP syntax (paths, entity tags as header text) lives in `tandem-http`'s `http`.
//!
//! | module | what |
//! |---|---|
//! | [`document`] | collection, id, key, document, stored state, preconditions, merge patch |
//! | [`write`](mod@write) | a write request and its outcome, and the rules that decide it |
//! | [`event`] | the change event (the one payload shape) and its Kafka headers codec |
//! | [`consistency`] | the `X-Consistency-Token` encoding |
//! | [`traceparent`] | W3C trace context values |
//! | [`limits`] | every size and depth limit on the write path |

pub mod consistency;
pub mod document;
pub mod event;
pub mod limits;
pub mod traceparent;
pub mod write;
