#!/usr/bin/env python3
"""Streaming load generator for any OpenAI-compatible chat server (glm-inference, llama.cpp's).

N concurrent clients each send chat completions with `stream: true` and read the server-sent
events; prints aggregate generated tokens per second, and p50/p99 of time to first token (TTFT)
and of inter-token latency (ITL, between consecutive content events). Standard library only.

  scripts/bench/loadgen.py --url http://127.0.0.1:8200 --model smollm2 -c 16 -n 16 --max-tokens 64

Tokens are counted from the final `usage` event when the server sends one
(`stream_options.include_usage`), else one per content event. `--ignore-eos` asks for exactly
--max-tokens tokens (vLLM's `ignore_eos`, which glm-inference accepts); `--ban-token ID` does the
same on servers that take OpenAI's `logit_bias` instead (llama-cpp-python).
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def one_request(url, body, timeout):
    """Returns (ttft_s, [event times], usage dict or None, error or None)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            return None, [], None, f"HTTP {resp.status}: {resp.read(300)!r}"
        times, usage = [], None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
        ttft = times[0] - start if times else None
        return ttft, times, usage, None
    except (OSError, http.client.HTTPException, ValueError) as e:
        return None, [], None, str(e)
    finally:
        conn.close()


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def request_body(args):
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.ban_token:
        body["logit_bias"] = {str(t): -100 for t in args.ban_token}
    return body


def run(args):
    body = request_body(args)
    lock = threading.Lock()
    ttfts, itls, tokens, errors = [], [], 0, []

    def client(_):
        nonlocal tokens
        ttft, times, usage, err = one_request(args.url, body, args.timeout)
        with lock:
            if err:
                errors.append(err)
                return
            if ttft is not None:
                ttfts.append(ttft)
            itls.extend(b - a for a, b in zip(times, times[1:]))
            tokens += usage["completion_tokens"] if usage else len(times)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        list(pool.map(client, range(args.requests)))
    wall = time.perf_counter() - start
    result = {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "errors": len(errors),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "itl_p50_ms": percentile(itls, 50) * 1e3,
        "itl_p99_ms": percentile(itls, 99) * 1e3,
    }
    return result, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8200")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--requests", type=int, default=None, help="default: the concurrency")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--ban-token", type=int, action="append", default=[])
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    args.requests = args.requests or args.concurrency
    result, errors = run(args)
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['requests']} requests, concurrency {result['concurrency']}, {result['errors']} errors: "
              f"{result['completion_tokens']} tokens in {result['wall_s']:.2f}s = {result['tok_per_s']:.1f} tok/s; "
              f"TTFT p50 {result['ttft_p50_ms']:.0f} ms p99 {result['ttft_p99_ms']:.0f} ms; "
              f"ITL p50 {result['itl_p50_ms']:.1f} ms p99 {result['itl_p99_ms']:.1f} ms")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
