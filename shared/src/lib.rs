//! Everything the Tandem binaries have in common: the document domain, PostgreSQL storage with
//! its transactional outbox, the Redis read cache, JWT authentication, configuration, metrics,
//! the problem+json error mapping and the transport adapter that runs one axum `Router` either
//! as an AWS Lambda function or as a plain HTTP server.

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
