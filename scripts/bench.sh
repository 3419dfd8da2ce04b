#!/usr/bin/env bash
# `make bench`: builds the release binaries and runs the benchmark (bench/, `tandem-bench`),
# which starts its own PostgreSQL clusters, Redis servers, Kafka broker and Tandem services,
# measures every figure next to a baseline taken in the same run, and writes
# docs/benchmarks.md (only the generated part between its markers; the analysis around it stays).
#
# Extra arguments go to tandem-bench, e.g. `bash scripts/bench.sh --quick --out /tmp/bench.md`.
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

ensure_rust
ensure_servers
ensure_kafka
export TANDEM_PG_BINDIR="$(pg_bindir)"

# pgbench is the write baseline. Debian ships it with the server package; older layouts with
# postgresql-contrib or postgresql-client.
if [ ! -x "$TANDEM_PG_BINDIR/pgbench" ] && ! have pgbench; then
  apt_install postgresql-contrib || apt_install postgresql-client
fi
have python3 || apt_install python3 # packs the Lambda zips whose size is reported

say "building release binaries (cargo build --release --workspace --bins)"
cargo build --release --workspace --bins --locked

ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=(--out docs/benchmarks.md)
fi
say "running target/release/tandem-bench ${ARGS[*]} (about 10 minutes; the machine should be otherwise idle)"
"${CARGO_TARGET_DIR:-target}/release/tandem-bench" "${ARGS[@]}"
