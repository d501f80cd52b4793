#!/usr/bin/env bash
# Validates every Kubernetes object we ship or emit against a fixed Kubernetes version (1.33):
#   1. manifests/*.yaml (the committed render of the chart, and the CRD);
#   2. the chart rendered with non-default values (watchNamespace, serviceMonitor, 2 replicas);
#   3. the example GLMModels (crds/examples/*.yaml) against the CRD's own openAPIV3Schema;
#   4. what the operator emits for each example: `glm-operator render -f <example>`.
# Built-in kinds go through kubernetes-validate --strict; GLMModels through jsonschema on the CRD
# plus its CEL rules (cel-python);
# ServiceMonitor (a Prometheus-operator CRD) is reported SKIPPED. Exits non-zero on any failure.
# Needs scripts/install-tools.sh first; set GLM_OPERATOR_BIN to skip `cargo run`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/chart.sh"
K8S_VERSION="${K8S_VERSION:-1.33.0}"
VALIDATOR="$ROOT/tests/manifests/validate_manifests.py"
require_tools "$HELM" "$PYTHON"
failures=0
summary=()

# validate LABEL FILE...: one validator run, its summary line kept for the final report.
validate() {
  local label="$1"; shift
  echo "== $label"
  local log="$work/log"
  if "$PYTHON" "$VALIDATOR" --quiet --kubernetes-version "$K8S_VERSION" --crd "$CRD" "$@" | tee "$log"; then
    summary+=("OK   $label: $(tail -n1 "$log")")
  else
    summary+=("FAIL $label: $(tail -n1 "$log")")
    failures=$((failures + 1))
  fi
}

# 1. Committed manifests.
shopt -s nullglob
manifests=("$ROOT"/manifests/*.yaml)
(( ${#manifests[@]} )) || { echo "no manifests/*.yaml: run scripts/render-manifests.sh" >&2; exit 1; }
validate "manifests/ (default values) + CRD" "${manifests[@]}" "$CRD"

# 2. Chart with every optional branch switched on.
"$HELM" lint --strict "$CHART" >"$work/lint.log" 2>&1 || { cat "$work/lint.log"; failures=$((failures + 1)); summary+=("FAIL helm lint --strict"); }
"$HELM" template glm "$CHART" --namespace glm-system \
  --set watchNamespace=ml-models --set serviceMonitor.enabled=true --set controller.replicaCount=2 \
  --set networkPolicy.enabled=true --set 'networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ml' \
  --set 'serviceMonitor.labels.release=prometheus' --set 'imagePullSecrets[0].name=regcred' \
  --set 'controller.extraEnv[0].name=HTTPS_PROXY' --set 'controller.extraEnv[0].value=http://proxy:3128' \
  >"$work/chart-non-default.yaml"
validate "chart, non-default values (namespaced RBAC, ServiceMonitor, NetworkPolicies)" "$work/chart-non-default.yaml"
"$HELM" template glm "$CHART" --namespace glm-system \
  --set controller.leaderElection.enabled=false --set serviceAccount.create=false --set serviceAccount.name=existing \
  --set gateway.serviceAccount.create=false --set gateway.serviceAccount.name=existing-gateway \
  --set podDisruptionBudget.enabled=false \
  >"$work/chart-minimal.yaml"
validate "chart, minimal values (no leader election, existing ServiceAccounts, no PDBs)" "$work/chart-minimal.yaml"

# 3 + 4. Example GLMModels, and the objects the operator builds for each.
examples=("$ROOT"/crds/examples/*.yaml)
if (( ${#examples[@]} == 0 )); then
  echo "no crds/examples/*.yaml" >&2
  failures=$((failures + 1)); summary+=("FAIL no example GLMModels")
else
  validate "example GLMModels against the CRD schema" "${examples[@]}"
  if [[ -n "${GLM_OPERATOR_BIN:-}" ]]; then
    operator=("$GLM_OPERATOR_BIN")
  else
    (cd "$ROOT" && cargo build -q -p glm-operator)
    operator=("${CARGO_TARGET_DIR:-$ROOT/target}/debug/glm-operator")
  fi
  rendered=()
  for example in "${examples[@]}"; do
    out="$work/emitted-$(basename "$example")"
    if "${operator[@]}" render -f "$example" >"$out" 2>"$work/render.err"; then
      rendered+=("$out")
    else
      echo "FAIL glm-operator render -f $example:"; cat "$work/render.err"
      failures=$((failures + 1)); summary+=("FAIL render $(basename "$example")")
    fi
  done
  (( ${#rendered[@]} )) && validate "objects emitted by glm-operator render" "${rendered[@]}"
fi

echo
echo "== summary (Kubernetes $K8S_VERSION)"
printf '%s\n' "${summary[@]}"
if (( failures )); then
  echo "validate-manifests: $failures check(s) FAILED"
  exit 1
fi
echo "validate-manifests: all checks passed"
