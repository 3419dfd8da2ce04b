#!/usr/bin/env bash
# `make test`: every test, against real servers the harness starts itself.
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

ensure_rust
ensure_servers
ensure_python_tools
export TANDEM_PG_BINDIR="$(pg_bindir)"

say "building the binaries the tests run (cargo build --workspace --bins)"
cargo build --workspace --bins --locked

say "running the test suite (cargo test --workspace)"
cargo test --workspace --locked -- --test-threads="${TANDEM_TEST_THREADS:-4}"
