# Tandem: the two set-up commands are `make up` and `make test` (see README.md).

.PHONY: up test fuzz chaos bench lint fmt clean-local

## Build and run the local system in the foreground; Ctrl-C stops everything.
up:
	@bash scripts/up.sh

## Run every test (installs or starts what the tests need).
test:
	@bash scripts/test.sh

## Fuzz the HTTP contract with schemathesis against a fresh `make up` (1,000 examples per
## operation, every check, stateful chains); stops the stack afterwards.
fuzz:
	@bash scripts/fuzz.sh

## The long seeded chaos run, "Region 2 never lies" (docs/chaos.md); TANDEM_CHAOS_SEED and
## TANDEM_CHAOS_SECONDS (default 300) choose it.
chaos:
	@bash scripts/chaos.sh

## Measure every hot path against its baseline (release build; writes docs/benchmarks.md).
bench:
	@bash scripts/bench.sh

## Formatting and lints as CI checks them.
lint:
	python3 scripts/check-layers.py --self-test
	python3 scripts/check-layers.py
	python3 scripts/check-features.py
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt:
	cargo fmt --all

## Remove the local stack's data (.tandem/).
clean-local:
	rm -rf .tandem
