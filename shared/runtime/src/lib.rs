//! What every Tandem process runs on, whatever it does: configuration from the environment,
//! secrets from AWS Secrets Manager, telemetry, the Prometheus registry, the shutdown token and,
//! with feature `kafka`, the Kafka client's configuration (brokers, TLS/SASL, topic creation).
//!
//! # Layout
//!
//! Layer 1, directly above `tandem-core`. It may depend on `tandem-core` and on third-party
//! crates for configuration, the AWS SDK, telemetry, the async runtime and the Kafka client,
//! never on `tandem-store`, `tandem-http` or anything above them (`scripts/check-layers.py`,
//! run by `make lint` and `make test`, fails if it does). No SQL and no HTTP server here; its
//! HTTP client sends the OTLP trace exporter's batches (`telemetry`) and a Lambda function's
//! start-up error (`lambda`).
//!
//! | module | what |
//! |---|---|
//! | [`config`] | reading settings from the environment; `ServiceSettings` |
//! | [`lambda`] | a Lambda function's start-up error, reported to the Runtime API |
//! | [`secrets`] | AWS Secrets Manager reads |
//! | [`telemetry`] | logging, and traces exported over OTLP/HTTP |
//! | [`metrics`] | the Prometheus registry and the HTTP metrics every service exports |
//! | [`shutdown`] | the shutdown token (`CancellationToken`), cancelled on SIGTERM or Ctrl-C |
//! | `kafka` | the Kafka client's configuration and topic creation (feature `kafka`) |

pub mod config;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod lambda;
pub mod metrics;
pub mod secrets;
pub mod shutdown;
pub mod telemetry;
