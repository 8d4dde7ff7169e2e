# Serin: the two commands of the quick start are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: deps build test lint demo crds chart bench-scale bench-soak

deps:
	bash scripts/install-deps.sh

build:
	$(CARGO) build --release --bin serin

# The test command (.ci/run calls exactly this): formatting and lints first, then every test of the
# workspace.
test: deps lint
	$(CARGO) nextest run --workspace --lib --bins --tests --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Runs the simulated cluster, a Prometheus server and the controller, then a good and a bad rollout.
demo: deps
	$(CARGO) run --bin serin -- demo

# Regenerates crds/ from the Rust types, and the chart's copy and deploy/ from them.
crds:
	SERIN_UPDATE_CRDS=1 $(CARGO) test -p serin --test crds
	SERIN_UPDATE_DEPLOY=1 $(CARGO) test -p serin-cli --test chart

# Refreshes the chart's copy of crds/ and the plain manifests in deploy/ from charts/serin.
chart:
	SERIN_UPDATE_DEPLOY=1 $(CARGO) test -p serin-cli --test chart

# Scale benchmark (crates/serin-cli/benches/scale.rs, a harness-less cargo bench, release build): `serin sim` and
# `serin controller` as separate processes, SERIN_SCALE_ROLLOUTS (default 10000) Rollouts created,
# settled, left idle, then all updated at once; prints controller RSS, CPU and writes per phase.
# Results and options: docs/benchmarks/scale.md.
bench-scale:
	SERIN_SCALE_MODE=scale $(CARGO) bench -p serin-cli --bench scale

# Soak (same file): continuous rollouts, some failing analysis on a real Prometheus, for SERIN_SOAK_SECONDS
# (default 600; hours work too); prints the controller's RSS slope and fails when it grew 5% or more.
bench-soak: deps
	SERIN_SCALE_MODE=soak $(CARGO) bench -p serin-cli --bench scale
