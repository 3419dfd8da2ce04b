//! Tandem's HTTP edge and process shell: problem+json errors ([`problem`]), JWT
//! authentication ([`auth`]), the extractors every handler starts with ([`extract`]), the HTTP syntax of paths and entity tags, the common layers and
//! the operations endpoints ([`http`]), the transport adapter that runs one axum `Router`
//! either as an AWS Lambda function or as a plain HTTP server ([`serve`]), and the elected
//! workers' shell: one active replica, its role, and the operations server beside it
//! ([`worker`]).
//!
//! # Layout
//!
//! Layer 3, the top of `shared/`: it may depend on `tandem-store`, `tandem-runtime`,
//! `tandem-core` and on the HTTP and JWT crates, never on Region 2's apply, the binaries'
//! crates, the tests or the benchmark (`scripts/check-layers.py`, run by `make lint` and
//! `make test`, fails if it does).

pub mod auth;
pub mod extract;
pub mod http;
pub mod problem;
pub mod serve;
pub mod worker;
