#!/usr/bin/env python3
"""The chat and embedding rows of scripts/bench-peers.sh measured through an OpenAI-compatible
server (glm-inference, or llama-cpp-python's for the chat rows): single-stream decode, N
concurrent streams, ~1,000-token prefill, and embeddings at batch 1/8/32. Prints one JSON object.

Decode rate: (content events - 1) / (last event - first event) of one streamed request, so the
prompt is excluded. Aggregate: generated tokens / wall time of N concurrent requests (prompts
included). Prefill: prompt tokens / time to first token of a 1-token request."""
import argparse
import http.client
import json
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inputs  # noqa: E402
import loadgen  # noqa: E402


def chat_args(args, **over):
    ns = argparse.Namespace(url=args.url, model=args.model, concurrency=1, requests=1,
                            max_tokens=args.decode_tokens, temperature=0.0, prompt=inputs.CHAT_PROMPT,
                            ignore_eos=args.ignore_eos, ban_token=args.ban_token, timeout=600.0)
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


def decode(args):
    rates = []
    for _ in range(args.repeat):
        ttft, times, usage, err = loadgen.one_request(args.url, loadgen.request_body(chat_args(args)), 600)
        if err or len(times) < 2:
            raise SystemExit(f"decode request failed: {err or 'fewer than 2 tokens'}")
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return statistics.median(rates)


def streams(args):
    runs = []
    for _ in range(args.repeat):
        result, errors = loadgen.run(chat_args(args, concurrency=args.streams, requests=args.streams,
                                               max_tokens=args.stream_tokens))
        if errors:
            raise SystemExit(f"stream requests failed: {errors[:3]}")
        runs.append(result)
    runs.sort(key=lambda r: r["tok_per_s"])
    return runs[len(runs) // 2]


def prefill(args):
    rates, tokens = [], 0
    for _ in range(args.repeat):
        body = loadgen.request_body(chat_args(args, prompt=inputs.long_prompt(), max_tokens=1, ignore_eos=False))
        start = time.perf_counter()
        ttft, times, usage, err = loadgen.one_request(args.url, body, 600)
        if err or not usage:
            raise SystemExit(f"prefill request failed: {err or 'no usage event'}")
        elapsed = ttft if ttft is not None else time.perf_counter() - start
        tokens = usage["prompt_tokens"]
        rates.append(tokens / elapsed)
    return statistics.median(rates), tokens


def embeddings(args):
    u = urllib.parse.urlsplit(args.url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)

    def post(texts):
        conn.request("POST", "/v1/embeddings", body=json.dumps({"model": args.embed_model, "input": texts}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"embeddings: HTTP {resp.status}: {body[:300]!r}")
        return len(json.loads(body)["data"])

    return {str(size): inputs.sentences_per_second(post, size, args.secs, args.repeat) for size in (1, 8, 32)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--embed-model", default=None, help="also measure embeddings with this model")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--ban-token", type=int, action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--skip-chat", action="store_true", help="only the embedding rows")
    ap.add_argument("--decode-only", action="store_true", help="only the single-stream decode row")
    args = ap.parse_args()
    result = {}
    if args.decode_only:
        print(json.dumps({"decode_tok_s": decode(args)}))
        return
    if not args.skip_chat:
        result["decode_tok_s"] = decode(args)
        s = streams(args)
        result["streams_tok_s"] = s["tok_per_s"]
        result["streams_detail"] = s
        result["prefill_tok_s"], result["prefill_tokens"] = prefill(args)
    if args.embed_model:
        result["embeddings"] = embeddings(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
