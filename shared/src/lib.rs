//! The I/O every Tandem binary has in common, around the domain of `tandem-core`: PostgreSQL
//! storage with its transactional outbox, the Redis read cache, JWT authentication,
//! configuration, metrics, the HTTP edge (problem+json errors, operations endpoints, the HTTP
//! syntax of paths and entity tags) and the transport adapter that runs one axum `Router`
//! either as an AWS Lambda function or as a plain HTTP server; with feature `kafka`, the Kafka
//! client configuration and the rdkafka side of the event headers.
//!
//! # Layout
//!
//! Layer 1, above `tandem-core` (layer 0). It may depend on `tandem-core` and on any
//! third-party crate (database, cache, Kafka, HTTP, AWS SDK, runtime), never on the crates
//! above it: Region 2's apply, the binaries' crates, the tests or the benchmark
//! (`scripts/check-layers.py`, run by `make lint` and `make test`, fails if it does). Domain
//! types and rules belong in `tandem-core`, not here; this crate re-exports none of them, so
//! users import them from `tandem_core` directly.

pub mod auth;
pub mod cache;
pub mod config;
pub mod db;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod migrations;
pub mod problem;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod worker;
