#!/usr/bin/env bash
# Speed of glm-inference side by side with what users would run instead, on this CPU, in one run
# (issue 13): llama.cpp (PyPI llama-cpp-python, compiled here with native CPU flags) on the same
# GGUF, transformers and sentence-transformers on PyTorch CPU. Prints the table of README
# "Throughput" with ratio columns; JSON files of every side stay in $GLM_BENCH_OUT.
#
# Self-contained on a clean clone: fetches the models (scripts/fetch-models.sh), installs the peers
# into ~/.cache/kubeglm-bench (scripts/bench/install-peers.sh; the first time compiles llama.cpp,
# ~15 min on 2 cores), builds glm-inference in release. Sides run one after the other, never
# together, each with the same thread count. Slow (~10 min after the first run); not part of
# scripts/test.sh. Run it when the machine is otherwise idle (`uptime` is printed before and after).
#
# env: GLM_BENCH_THREADS (default: nproc), GLM_BENCH_REPEAT (runs per figure, median; default 3),
#      GLM_BENCH_DECODE_TOKENS (single-stream decode length, default 128),
#      GLM_BENCH_ROUNDS (interleaved single-stream decode rounds, default 5; 0 skips them),
#      OMP_WAIT_POLICY (passed to llama.cpp's OpenMP threads; unset = llama.cpp's default
#      spin-waiting, which collapses when other processes share the cores: PASSIVE then),
#      GLM_BENCH_OUT (default target/bench-peers), GLM_BENCH_CACHE (peer venv, ~/.cache/kubeglm-bench),
#      CARGO_TARGET_DIR (where the release build goes).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads="${GLM_BENCH_THREADS:-$(nproc)}"
repeat="${GLM_BENCH_REPEAT:-3}"
decode_tokens="${GLM_BENCH_DECODE_TOKENS:-128}"
rounds="${GLM_BENCH_ROUNDS:-5}"
out="${GLM_BENCH_OUT:-$root/target/bench-peers}"
gguf="$root/.models/SmolLM2-135M-Instruct.Q4_1.gguf"
minilm="$root/.models/all-MiniLM-L6-v2"
mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.txt

./scripts/fetch-models.sh
py="$(scripts/bench/install-peers.sh)"
cargo build --release -p glm-inference >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/glm-inference"

server_pid=""
pids=() # servers running side by side (the interleaved decode rounds)
stop_server() {
  for pid in $server_pid "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  server_pid=""
  pids=()
}
trap stop_server EXIT

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_ready() { # url path
  for _ in $(seq 600); do
    if curl -fsS "$1$2" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then echo "server exited" >&2; return 1; fi
    sleep 0.5
  done
  echo "server at $1 never became ready" >&2
  return 1
}

echo "== $(date -u +%FT%TZ) $(uname -n), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads" | tee "$out/machine.txt"
echo "load before: $(uptime)" | tee -a "$out/machine.txt"
echo "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-<llama.cpp default>}, GLM_BENCH_REPEAT=$repeat, decode tokens $decode_tokens" | tee -a "$out/machine.txt"
"$py" scripts/bench/bandwidth.py "$threads" >"$out/bandwidth.txt"
"$py" scripts/bench/gguf_info.py "$gguf" >"$out/gguf.json"

echo "-- llama.cpp (in process)" >&2
"$py" scripts/bench/llamacpp_bench.py --gguf "$gguf" --threads "$threads" --repeat "$repeat" \
  --decode-tokens "$decode_tokens" >"$out/llamacpp.json" 2>"$out/llamacpp.log"

echo "-- transformers / sentence-transformers" >&2
"$py" scripts/bench/hf_bench.py --gguf "$gguf" --minilm "$minilm" --threads "$threads" --repeat "$repeat" \
  --decode-tokens "$decode_tokens" >"$out/hf.json"

for mode in auto quantized; do
  echo "-- glm-inference --gguf-mode $mode" >&2
  port="$(free_port)"
  url="http://127.0.0.1:$port"
  models=(--model "smollm2=$gguf")
  embed=()
  if [ "$mode" = auto ]; then
    models+=(--model "minilm=$minilm")
    embed=(--embed-model minilm)
  fi
  RUST_LOG=warn "$bin" "${models[@]}" --host 127.0.0.1 --port "$port" --threads "$threads" \
    --gguf-mode "$mode" --chat-max-batch-size 16 &
  server_pid=$!
  wait_ready "$url" /ready
  # After loading and warm-up, before any request: the weights' share of the goal.
  loaded=$(awk '/^VmRSS/ {r = $2 * 1024} /^RssAnon/ {a = $2 * 1024} END {print r, a}' "/proc/$server_pid/status")
  "$py" scripts/bench/server_bench.py --url "$url" --ignore-eos --repeat "$repeat" \
    --decode-tokens "$decode_tokens" "${embed[@]}" >"$out/glm-$mode.raw"
  rss=$(awk '/VmHWM/ {print $2 * 1024}' "/proc/$server_pid/status")
  "$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["rss_bytes"]=int(sys.argv[2]); r["loaded_rss_bytes"], r["loaded_anon_bytes"]=map(int, sys.argv[3].split()); print(json.dumps(r))' \
    "$out/glm-$mode.raw" "$rss" "$loaded" >"$out/glm-$mode.json"
  rm -f "$out/glm-$mode.raw"
  stop_server
done

# Single-stream decode again, the sides taking turns: llama.cpp's rate moved between 72 and 103
# tok/s from one run of this script to the next while ours stayed within a few percent, so a
# ratio of two figures taken minutes apart says little. Turns a few seconds apart see the same
# machine; each side's figure in a round is the median of GLM_BENCH_REPEAT decodes, and the table
# reports the median of the per-round ratios.
if [ "$rounds" -gt 0 ]; then
  echo "-- single-stream decode, $rounds interleaved rounds" >&2
  declare -A urls=()
  for mode in auto quantized; do
    port="$(free_port)"
    urls[$mode]="http://127.0.0.1:$port"
    RUST_LOG=warn "$bin" --model "smollm2=$gguf" --host 127.0.0.1 --port "$port" --threads "$threads" \
      --gguf-mode "$mode" &
    server_pid=$!
    pids+=("$server_pid")
    wait_ready "${urls[$mode]}" /ready
  done
  : >"$out/decode-rounds.jsonl"
  for _ in $(seq "$rounds"); do
    l=$("$py" scripts/bench/llamacpp_bench.py --gguf "$gguf" --threads "$threads" --repeat "$repeat" \
      --decode-tokens "$decode_tokens" --decode-only 2>>"$out/llamacpp.log")
    a=$("$py" scripts/bench/server_bench.py --url "${urls[auto]}" --ignore-eos --repeat "$repeat" \
      --decode-tokens "$decode_tokens" --decode-only)
    q=$("$py" scripts/bench/server_bench.py --url "${urls[quantized]}" --ignore-eos --repeat "$repeat" \
      --decode-tokens "$decode_tokens" --decode-only)
    echo "{\"llama\": $l, \"auto\": $a, \"quantized\": $q}" >>"$out/decode-rounds.jsonl"
  done
  stop_server
fi

echo "-- llama-cpp-python server (streaming load, for TTFT / inter-token latency)" >&2
port="$(free_port)"
"$py" -m llama_cpp.server --model "$gguf" --n_threads "$threads" --n_ctx 4096 --host 127.0.0.1 --port "$port" \
  >"$out/llamacpp-server.log" 2>&1 &
server_pid=$!
wait_ready "http://127.0.0.1:$port" /v1/models
# SmolLM2's end tokens (<|endoftext|> 0, <|im_end|> 2) banned so that every stream runs 64 tokens.
"$py" scripts/bench/loadgen.py --url "http://127.0.0.1:$port" --model smollm2 -c 16 --max-tokens 64 \
  --ban-token 0 --ban-token 2 --json >"$out/llamacpp-server.json" || true
stop_server

echo "load after: $(uptime)" | tee -a "$out/machine.txt"
echo
cat "$out/machine.txt"
"$py" scripts/bench/table.py "$out" | tee "$out/table.md"
