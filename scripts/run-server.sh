#!/usr/bin/env bash
# Run glm-inference locally with the small real models: fetch them into .models/ (once), then serve
# all-MiniLM-L6-v2 on :8200 (API_PORT overrides). Extra arguments go to glm-inference, e.g.
#   scripts/run-server.sh --api-key secret --max-batch-tokens 8192
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/fetch-models.sh
models="${MODELS_DIR:-$root/.models}"
exec cargo run --release -p glm-inference -- \
  --model "all-MiniLM-L6-v2=$models/all-MiniLM-L6-v2" \
  "$@"
