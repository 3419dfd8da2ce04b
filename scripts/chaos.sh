#!/usr/bin/env bash
# `make chaos`: the long seeded chaos run, "Region 2 never lies" (docs/chaos.md). A dedicated
# two-region system takes a seeded workload while a seeded nemesis kills, freezes and cuts off
# its parts; the whole history is then checked and a report printed.
#
#   TANDEM_CHAOS_SEED     the seed (default: a random one, printed; rerun a run with it)
#   TANDEM_CHAOS_SECONDS  how long the faults go on (default 300)
#   TANDEM_CHAOS_REPORT   where the report is also written (default: under $TMPDIR)
#   TANDEM_KEEP_TEST_LOGS keep the services' logs even when the run is clean
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

ensure_rust
ensure_servers
ensure_kafka
export TANDEM_PG_BINDIR="$(pg_bindir)"
export TANDEM_CHAOS_SEED="${TANDEM_CHAOS_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
export TANDEM_CHAOS_SECONDS="${TANDEM_CHAOS_SECONDS:-300}"
export TANDEM_CHAOS_REPORT="${TANDEM_CHAOS_REPORT:-${TMPDIR:-/tmp}/tandem-chaos-$TANDEM_CHAOS_SEED.txt}"

say "building the binaries the run starts (cargo build --workspace --bins)"
cargo build --workspace --bins --locked

say "chaos run: seed $TANDEM_CHAOS_SEED, $TANDEM_CHAOS_SECONDS s of faults"
status=0
cargo test --locked -p tandem-tests --test chaos -- --ignored --nocapture \
  region2_never_lies_through_a_long_seeded_run || status=$?
say "the report is in $TANDEM_CHAOS_REPORT (seed $TANDEM_CHAOS_SEED)"
exit "$status"
