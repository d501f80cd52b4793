#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU and CUDA 13 (driver and cuBLAS/cuRAND/
# NVRTC 13 libraries), no Rust and no network. It runs what scripts/build-cuda.sh packed into
# .gpu-check/ (carry that folder), in about 3-6 minutes on an H200:
#   1. the tiny fixtures' parity on the GPU in float32 (logits <= 1e-3, greedy ids equal) and in
#      bfloat16 (logits <= 0.15, greedy ids equal until a reference margin < 0.3);
#   2. the server binary on the GPU: start on a tiny fixture, one chat completion over HTTP;
#   3. GLM-4-9B-chat's real shapes with dummy weights (bf16, 18.8 GB): decode at 1, 8, 32, 64
#      concurrent streams, tokens/s and the share of the HBM roofline (GPU_CHECK_HBM_GBPS, default
#      4800 for the H200).
# Usage: scripts/gpu-check.sh [BUNDLE_DIR]   (default .gpu-check); OUT=dir keeps the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=$(cd "${1:-.gpu-check}" && pwd)
hbm=${GPU_CHECK_HBM_GBPS:-4800}
log_dir=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The CUDA libraries: the system's, else the ones pip-installed for PyTorch (nvidia/cu13/lib).
libdirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib \
  /usr/lib/x86_64-linux-gnu; do
  [ -e "$d/libcublas.so.13" ] && libdirs+=("$d")
done
for py in python3 /opt/torch/.venv/bin/python3; do
  d=$("$py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
  [ -n "$d" ] && [ -e "$d/libcublas.so.13" ] && libdirs+=("$d")
done
[ ${#libdirs[@]} -gt 0 ] || { echo "gpu-check: libcublas.so.13 not found (CUDA 13 libraries needed)" >&2; exit 1; }
export LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: CUDA libraries from $LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

for b in glm-inference chat_engine; do
  if command -v xz >/dev/null; then xz -dc "$bundle/bin/$b.xz" >"$work/$b"
  else python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$bundle/bin/$b.xz" >"$work/$b"; fi
  chmod +x "$work/$b"
done
export GLM_FIXTURES_DIR="$bundle/fixtures"
tiny=()
for f in glm4-9b-chat-hf glm4-0414 qwen2 llama deepseek-v3; do tiny+=("$bundle/fixtures/tiny/$f"); done

echo; echo "== 1. parity of the tiny fixtures on the GPU"
status=0
"$work/chat_engine" --device cuda --dtype f32 --parity "${tiny[@]}" 2>&1 | tee "$log_dir/parity-f32.log" || status=1
"$work/chat_engine" --device cuda --dtype bf16 --parity "${tiny[@]}" 2>&1 | tee "$log_dir/parity-bf16.log" || status=1

echo; echo "== 2. the server on the GPU (tiny GLM-4, one chat completion)"
"$work/glm-inference" --device cuda --model glm4="${tiny[0]}" --host 127.0.0.1 --port 18200 \
  >"$log_dir/server.log" 2>&1 &
server=$!
python3 - <<'PY' || status=1
import json, time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen("http://127.0.0.1:18200/ready", timeout=1)
        break
    except Exception:
        time.sleep(0.5)
body = json.dumps({"model": "glm4", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 8}).encode()
req = urllib.request.Request("http://127.0.0.1:18200/v1/chat/completions", body, {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=60))
print("server:", r["choices"][0]["finish_reason"], r["usage"])
PY
kill "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
grep -E "KV|decoder ready|error" "$log_dir/server.log" | head -5 || true

echo; echo "== 3. GLM-4-9B-chat shapes, dummy bf16 weights: decode throughput"
"$work/chat_engine" --bench --device cuda --model "$bundle/models/glm-4-9b-chat-hf" --load-format dummy \
  --concurrency 1,8,32,64 --prompt-tokens 128 --max-tokens 32 --hbm-gbps "$hbm" 2>&1 |
  tee "$log_dir/decode.log" || status=1
echo; echo "gpu-check: $([ $status = 0 ] && echo PASS || echo FAIL) (logs in $log_dir)"
exit $status
