#!/usr/bin/env bash
# Gateway overhead (issue 10): p50/p99 latency of requests sent straight to a glm-inference
# process vs through the gateway (per-pod routing, least load, the same code as in-cluster with a
# static routing table), 1 and 8 concurrent keep-alive clients. Prints the README's table.
#
# Builds release binaries; the backend serves the tiny GLM-4 fixture and the request is a small
# /tokenize (a cheap model call, so the gateway's share is visible). Not part of scripts/test.sh.
# Run it when the machine is otherwise idle (`uptime` is printed before and after).
#
# env: GLM_BENCH_REQUESTS (per row, default 2000), GLM_FIXTURES_DIR (default ../shared/fixtures),
#      CARGO_TARGET_DIR (where the release build goes).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
fixtures="${GLM_FIXTURES_DIR:-$root/../shared/fixtures}"
model="$fixtures/tiny/glm4-0414"
[[ -f "$model/model.safetensors" ]] || { echo "missing $model (set GLM_FIXTURES_DIR)" >&2; exit 1; }

cargo build --release -p glm-inference >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/glm-inference"
log="$(mktemp)"
"$bin" --host 127.0.0.1 --port 0 --model "tiny=$model" >"$log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  addr="$(grep -o 'listening on [^ ]*' "$log" | head -1 | sed 's/listening on //; s#http://##')" || true
  [[ -n "${addr:-}" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "${addr:-}" ]] || { echo "glm-inference did not start" >&2; cat "$log" >&2; exit 1; }

echo "load before: $(uptime)"
GLM_BENCH_BACKEND="$addr" cargo bench -p glm-operator --bench gateway
echo "load after: $(uptime)"
