#!/usr/bin/env bash
# Builds the Lambda packages for arm64 (Graviton): the Write and Read functions,
#   target/lambda/tandem-write/bootstrap.zip and target/lambda/tandem-read/bootstrap.zip
# (the paths the Terraform lambda module reads, variable lambda_zip_paths), and Region 2's apply
# function, target/lambda/tandem-region2-apply-lambda/bootstrap.zip (lambda_kafka module).
# With CARGO_TARGET_DIR set, target/ is that directory.
# cargo-lambda (from PyPI, with zig for cross-linking) goes into a cached virtualenv, and the
# arm64 Rust target is added here, by the script that needs it. Needs access to PyPI and to the
# Rust toolchain distribution server (rustup); CI's release workflow runs the same steps.
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

CARGO_LAMBDA_VERSION=1.9.2
venv="$TANDEM_CACHE/venv-lambda"
if [ ! -x "$venv/bin/cargo-lambda" ]; then
  say "installing cargo-lambda $CARGO_LAMBDA_VERSION into $venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q "cargo-lambda==$CARGO_LAMBDA_VERSION" >&2
fi
export PATH="$venv/bin:$PATH"

say "adding the aarch64-unknown-linux-gnu Rust target"
rustup target add aarch64-unknown-linux-gnu >&2

say "building the arm64 Lambda packages (cargo lambda build --release --arm64)"
cargo lambda build --release --arm64 --output-format zip -p tandem-write -p tandem-read \
  -p tandem-region2-apply
out="${CARGO_TARGET_DIR:-target}/lambda"
ls -l "$out/tandem-write/bootstrap.zip" "$out/tandem-read/bootstrap.zip" \
  "$out/tandem-region2-apply-lambda/bootstrap.zip"
