#!/usr/bin/env bash
# Run glm-inference locally with the small real models: fetch them into .models/ (once), then serve
#   smollm2           SmolLM2-135M-Instruct Q4_1 GGUF, the default chat model (first chat model;
#                     GLM_MODEL picks another)
#   all-MiniLM-L6-v2  sentence embeddings
# on :8200 (API_PORT overrides). Extra arguments go to glm-inference, e.g.
#   scripts/run-server.sh --api-key secret --chat-max-batch-size 4
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/fetch-models.sh
models="${MODELS_DIR:-$root/.models}"
exec cargo run --release -p glm-inference -- \
  --model "smollm2=$models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --model "all-MiniLM-L6-v2=$models/all-MiniLM-L6-v2" \
  "$@"
