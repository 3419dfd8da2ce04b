#!/usr/bin/env bash
# `make test`: every test, against real servers the harness starts itself, then the offline
# checks of the HTTP contract and of the deployment (Terraform, manifests, workflows, images).
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

ensure_rust
ensure_servers
ensure_python_tools
ensure_kafka
export TANDEM_PG_BINDIR="$(pg_bindir)"

say "checking the crates' layering (scripts/check-layers.py: its self-test, then the workspace)"
python3 scripts/check-layers.py --self-test
python3 scripts/check-layers.py
say "checking that each Lambda function's package reuses the workspace build (scripts/check-features.py)"
python3 scripts/check-features.py

say "building the binaries the tests run (cargo build --workspace --bins)"
cargo build --workspace --bins --locked

say "running the test suite (cargo test --workspace)"
cargo test --workspace --locked

say "running the benchmark in quick mode (tiny sizes, figures not judged) so it never rots"
"${CARGO_TARGET_DIR:-target}/debug/tandem-bench" --quick >"${TMPDIR:-/tmp}/tandem-bench-quick.md"
say "quick benchmark ran; its report is in ${TMPDIR:-/tmp}/tandem-bench-quick.md"

say "checking the OpenAPI contract (scripts/check-openapi.sh)"
bash scripts/check-openapi.sh

say "checking the deployment offline (scripts/check-deploy.sh)"
bash scripts/check-deploy.sh
