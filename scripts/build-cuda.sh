#!/usr/bin/env bash
# Build the CUDA release binaries on a machine without a GPU and pack what the GPU check needs into
# .gpu-check/ (git-ignored), for scripts/gpu-check.sh on a GPU machine that has CUDA 13 but no Rust
# and no network. Not part of scripts/test.sh (scripts/check-cuda.sh is).
#
#   scripts/build-cuda.sh            -> .gpu-check/{bin/*.xz, fixtures/tiny/*, models/*}
#
# The CUDA libraries the binaries link against (cuBLAS, cuBLASLt, cuRAND, NVRTC 13.0) come from
# NVIDIA's PyPI wheels, the driver library from a link-time stub (scripts/cuda-toolkit.sh); at run
# time the GPU machine's own libraries are used. Kernels are built for CUDA_COMPUTE_CAP (default
# 90: H100/H200). Cold: ~660 MB of wheels (cuBLAS is most of it) and a full release build.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/cuda-toolkit.sh
cuda_toolkit libraries
export CARGO_TARGET_DIR="$CUDA_CACHE/target"
# GNU ld resolves the libraries' own dependencies (cuBLAS -> cuBLASLt) through LD_LIBRARY_PATH.
export LD_LIBRARY_PATH="$CUDA_ROOT/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cargo build --release --locked -p glm-inference --features cuda --bin glm-inference
bench=$(cargo bench --no-run --locked -p glm-inference --features cuda --bench chat_engine \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "chat_engine" and m.get("executable"):
        print(m["executable"])')
[ -x "$bench" ] || { echo "build-cuda: chat_engine bench executable not found" >&2; exit 1; }

out="$repo/.gpu-check"
rm -rf "$out"
mkdir -p "$out/bin" "$out/fixtures/tiny" "$out/models"
for pair in "glm-inference:$CARGO_TARGET_DIR/release/glm-inference" "chat_engine:$bench"; do
  name=${pair%%:*} src=${pair#*:}
  strip -o "$out/bin/$name" "$src"
  xz -T0 -6 "$out/bin/$name"
done
fixtures="${GLM_FIXTURES_DIR:-$repo/../shared/fixtures}"
for f in glm4-9b-chat-hf glm4-0414 qwen2 llama deepseek-v3; do
  cp -r "$fixtures/tiny/$f" "$out/fixtures/tiny/$f"
done
cp -r scripts/gpu-check/models/. "$out/models/"
du -sh "$out"/bin/* "$out"
echo "build-cuda: bundle ready in $out (carry .gpu-check, run scripts/gpu-check.sh)" >&2
