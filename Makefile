# Serin: the two commands of the quick start are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: deps build test lint demo crds chart

deps:
	bash scripts/install-deps.sh

build:
	$(CARGO) build --release --bin serin

# The test command (.ci/run calls exactly this).
test: deps
	$(CARGO) nextest run --lib --bins --tests --no-fail-fast

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Runs the simulated cluster, a Prometheus server and the controller, then a good and a bad rollout.
demo: deps
	$(CARGO) run --bin serin -- demo

# Regenerates crds/ from the Rust types, and the chart's copy and deploy/ from them.
crds:
	SERIN_UPDATE_CRDS=1 $(CARGO) test --test crds
	SERIN_UPDATE_DEPLOY=1 $(CARGO) test --test chart

# Refreshes the chart's copy of crds/ and the plain manifests in deploy/ from charts/serin.
chart:
	SERIN_UPDATE_DEPLOY=1 $(CARGO) test --test chart
