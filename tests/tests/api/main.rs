//! Region 1 Write and Read APIs against real PostgreSQL, Redis and HTTP.

mod bad_inputs;
mod cache;
mod concurrency;
mod jwks;
mod lambda;
mod lambda_runtime;
mod limits;
mod near_cache;
mod ops;
mod outage;
mod outbox;
mod reads;
mod roles;
mod secrets;
mod writes;
