#!/usr/bin/env bash
# Install the peers that scripts/bench-peers.sh compares glm-inference with, from PyPI, into a venv
# under the bench cache (default ~/.cache/kubeglm-bench, env GLM_BENCH_CACHE):
#   llama-cpp-python[server]  vendors llama.cpp and compiles it here with cmake, so its C API and
#                             `python -m llama_cpp.server` run llama.cpp's own kernels;
#   sentence-transformers, transformers, gguf, torch (CPU is what runs; PyPI's wheel brings CUDA
#                             libraries too).
# Idempotent: a venv whose stamp matches the pins and cmake flags is reused. Prints the venv's python.
set -euo pipefail
cache="${GLM_BENCH_CACHE:-$HOME/.cache/kubeglm-bench}"
venv="$cache/venv"
py=$(command -v python3 || command -v python)
llama="llama-cpp-python[server]==0.3.36"
pins="sentence-transformers==6.2.0 transformers==5.24.0 torch==2.15.0 gguf==0.19.0 accelerate==1.15.0"
# llama.cpp with the SIMD this machine class has (AVX2, AVX-512 incl. VNNI/BF16/VBMI, AVX-VNNI).
# Not GGML_NATIVE: on these KVM guests cpuid reports AMX, -march=native compiles ggml's AMX path,
# and its first `tilezero` dies with SIGILL (the hypervisor does not enable AMX tile state).
cmake_args="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON}"
stamp_py="$venv/.kubeglm-pins"
stamp_llama="$venv/.kubeglm-llama"
want_llama="$llama $cmake_args"
if [ -f "$stamp_py" ] && [ "$(cat "$stamp_py")" = "$pins" ] \
  && [ -f "$stamp_llama" ] && [ "$(cat "$stamp_llama")" = "$want_llama" ]; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$cache"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
if [ ! -f "$stamp_py" ] || [ "$(cat "$stamp_py")" != "$pins" ]; then
  echo "installing $pins into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip wheel >&2
  "$venv/bin/python" -m pip install --quiet $pins >&2
  echo "$pins" >"$stamp_py"
fi
if [ ! -f "$stamp_llama" ] || [ "$(cat "$stamp_llama")" != "$want_llama" ]; then
  echo "building $llama into $venv (llama.cpp compiles from source: ~15-25 min on 2 cores)" >&2
  # A wheel built with other cmake flags may sit in pip's cache under the same version.
  "$venv/bin/python" -m pip uninstall --quiet -y llama-cpp-python >&2 || true
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$venv/bin/python" -m pip install --quiet --no-cache-dir "$llama" >&2
  echo "$want_llama" >"$stamp_llama"
fi
echo "$venv/bin/python"
