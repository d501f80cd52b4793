# Sourced by check-cuda.sh and build-cuda.sh: a CUDA 13.0 toolkit assembled from NVIDIA's PyPI wheels
# into a cache, so that the `cuda` feature builds on machines without a system CUDA installation.
#
#   cuda_toolkit compiler   nvcc + headers: enough for `cargo check --features cuda` (candle's kernels
#                           are compiled to PTX by their build script)
#   cuda_toolkit libraries  the above plus cuBLAS/cuRAND/NVRTC and a link-time stub of the driver
#                           library: enough to link a binary (the real libraries come from the GPU host)
#
# Exports CUDA_ROOT/CUDA_PATH/CUDA_HOME, PATH and CUDA_COMPUTE_CAP (default 90: sm_90a, H100/H200).
# CUDA 13.0 because cudarc 0.19 (candle 0.11) supports up to 13.4 and 13.0 runs on every CUDA 13
# driver; the 12.x nvcc wheels ship no `nvcc` driver program. KUBEGLM_CUDA_CACHE moves the cache.

CUDA_CACHE="${KUBEGLM_CUDA_CACHE:-$HOME/.cache/kubeglm/cuda}"
CUDA_COMPILER_PACKAGES=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
)
CUDA_LIBRARY_PACKAGES=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)

# Install `packages` into $CUDA_CACHE/<name> once (a marker file records the exact list).
_cuda_install() {
  local name=$1
  shift
  local dir="$CUDA_CACHE/$name" want="$*"
  if [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$want" ]; then
    return
  fi
  echo "cuda-toolkit: installing $want into $dir" >&2
  rm -rf "$dir"
  local py
  py=$(command -v python3 || command -v python)
  "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --no-compile \
    --target "$dir" "$@"
  echo "$want" >"$dir/.installed"
}

# One CUDA root: bin/, nvvm/, include/ (with cccl/), lib64/ (with unversioned .so names), also under
# targets/x86_64-linux/ where nvcc.profile may look.
_cuda_assemble() {
  local root=$1
  shift
  rm -rf "$root"
  mkdir -p "$root/lib64" "$root/include" "$root/targets/x86_64-linux"
  local src
  for src in "$@"; do
    local cu="$src/nvidia/cu13"
    [ -d "$cu/bin" ] && ln -sfn "$cu/bin" "$root/bin"
    [ -d "$cu/nvvm" ] && ln -sfn "$cu/nvvm" "$root/nvvm"
    [ -d "$cu/include" ] && cp -rs "$cu/include/." "$root/include/"
    [ -d "$cu/lib" ] && cp -rs "$cu/lib/." "$root/lib64/"
  done
  local lib
  for lib in "$root"/lib64/lib*.so.*; do
    [ -e "$lib" ] || continue
    local base=${lib##*/}
    ln -sfn "$base" "$root/lib64/${base%%.so.*}.so"
  done
  ln -sfn ../../include "$root/targets/x86_64-linux/include"
  ln -sfn ../../lib64 "$root/targets/x86_64-linux/lib"
}

# A libcuda.so with SONAME libcuda.so.1 and an empty function for every driver symbol cudarc links
# against: enough for the linker; at run time the GPU host's real libcuda.so.1 is loaded instead.
_cuda_driver_stub() {
  local root=$1
  local stub="$root/lib64/stubs"
  mkdir -p "$stub"
  local cudarc
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)
  if [ -z "$cudarc" ]; then
    echo "cuda-toolkit: cudarc sources not found; run cargo fetch first" >&2
    return 1
  fi
  # cudarc's driver bindings declare every function it may call as `fn cuXxx(` in extern blocks.
  grep -hoE '\bfn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" | sed -E 's/fn ([A-Za-z0-9_]+)\(/\1/' |
    sort -u | sed 's/.*/void &(void) {}/' >"$stub/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/cuda_stub.c"
  ln -sfn libcuda.so "$stub/libcuda.so.1"
}

cuda_toolkit() {
  local what=${1:-compiler}
  _cuda_install compiler "${CUDA_COMPILER_PACKAGES[@]}"
  local sources=("$CUDA_CACHE/compiler")
  if [ "$what" = libraries ]; then
    _cuda_install libraries "${CUDA_LIBRARY_PACKAGES[@]}"
    sources+=("$CUDA_CACHE/libraries")
  fi
  local root="$CUDA_CACHE/root-$what"
  local stamp="${CUDA_COMPILER_PACKAGES[*]} ${what}"
  if [ ! -f "$root/.assembled" ] || [ "$(cat "$root/.assembled")" != "$stamp" ]; then
    _cuda_assemble "$root" "${sources[@]}"
    echo "$stamp" >"$root/.assembled"
  fi
  if [ "$what" = libraries ] && [ ! -f "$root/lib64/stubs/libcuda.so" ]; then
    _cuda_driver_stub "$root"
  fi
  export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root" CUDA_TOOLKIT_ROOT_DIR="$root"
  export PATH="$root/bin:$PATH"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  if [ "$what" = libraries ]; then
    export LIBRARY_PATH="$root/lib64:$root/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
}
