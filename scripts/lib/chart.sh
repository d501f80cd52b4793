# Sourced by the scripts that render or check the Helm chart (render-manifests.sh,
# validate-manifests.sh, scan-chart.sh): where the chart, the CRD and the tools that
# scripts/install-tools.sh installs live, and a scratch folder `$work` removed on exit.
# HELM, PYTHON and CHECKOV may be set to use other binaries.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="$ROOT/charts/glm-operator"
CRD="$ROOT/crds/glmmodel.yaml"
HELM="${HELM:-$ROOT/.tools/bin/helm}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CHECKOV="${CHECKOV:-$ROOT/.tools/checkov/bin/checkov}"

# require_tools PATH...: exits 1 naming the first PATH that is not an executable.
require_tools() {
  local tool
  for tool in "$@"; do
    [[ -x "$tool" ]] || { echo "$tool not found: run scripts/install-tools.sh" >&2; exit 1; }
  done
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
