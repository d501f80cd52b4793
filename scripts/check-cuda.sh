#!/usr/bin/env bash
# Type-check the whole workspace with the `cuda` feature, candle's CUDA kernels included (their build
# script compiles them to PTX with nvcc), on a machine without a GPU or a system CUDA toolkit: nvcc
# comes from NVIDIA's PyPI wheels (scripts/cuda-toolkit.sh), cached under ~/.cache/kubeglm/cuda.
# Run by scripts/test.sh. Its own target folder keeps the CPU build's artefacts untouched.
# Cold: ~25 MB of wheels, then candle-kernels' nvcc run and a check of every crate (README "Tests").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-toolkit.sh
cuda_toolkit compiler
export CARGO_TARGET_DIR="$CUDA_CACHE/target"
echo "check-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR" >&2
cargo check --workspace --locked --all-targets --features glm-inference/cuda
