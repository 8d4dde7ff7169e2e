# Serin: the two commands of the quick start are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: deps build test lint demo crds chart

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
