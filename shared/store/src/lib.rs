//! Every SQL statement and Redis script of Tandem's shared tables, one module per table
//! family: connection pools and credentials ([`db`]), the schema ([`migrations`], the SQL files
//! in `migrations/`), the documents and the outbox rows their writes enqueue in the same
//! transaction ([`documents`]), the relay's side of the outbox: fetching, marking, setting
//! aside, pruning and replaying its rows ([`outbox`]), Region 2's tables as its apply writes
//! them ([`replica`]) and as its Read API reads the lag from them ([`lag`]), the leader
//! election and its epochs ([`leader`]), the Redis read cache ([`cache`]), and the read-only
//! range checksums `tandem verify` compares between the regions ([`verify`]: its own module
//! because it reads `documents` in both regions for one purpose, and writes nothing).
//!
//! # Layout
//!
//! Layer 2, above `tandem-runtime` and `tandem-core`. It may depend on those two and on the
//! database, cache and AWS SDK crates, never on `tandem-http` or anything above it
//! (`scripts/check-layers.py`, run by `make lint` and `make test`, fails if it does). Domain
//! types and rules belong in `tandem-core`; this crate stores and loads them.

pub mod cache;
pub mod db;
pub mod documents;
pub mod housekeeping;
pub mod lag;
pub mod leader;
pub mod migrations;
pub mod near;
pub mod outbox;
pub mod replica;
pub mod roles;
pub mod verify;
