//! The integration-test harness. It starts real servers in its own directories and on its own
//! ports (PostgreSQL clusters with `initdb`/`pg_ctl`, `redis-server`, Apache Kafka nodes and
//! clusters, the moto Secrets Manager emulator), spawns the Tandem services in-process or as their real binaries, and offers
//! typed helpers for the tests in `tests/`.
//!
//! Every server the harness starts is supervised by a small shell watchdog that stops it (and
//! removes its data) when the test process exits, however it exits.

pub mod chaos;
pub mod edge;
pub mod kafka;
pub mod process;
pub mod proxy;
pub use process::{binary, scratch_dir};
pub mod regions;
pub mod services;
pub mod symmetric;

pub use kafka::{Broker, KafkaCluster};
pub use process::{ManagedProcess, free_port, wait_for_port};
pub use regions::TwoRegions;
pub use services::{
    Postgres, Redis, TestApp, TestAppOptions, plant_cache_entry, serve, spawn_app, spawn_app_with,
};
