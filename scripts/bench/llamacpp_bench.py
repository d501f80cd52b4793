#!/usr/bin/env python3
"""llama.cpp's own speed on a GGUF, in process through llama-cpp-python's C API (what
llama-server and llama-batched-bench run): single-stream greedy decode, N sequences decoded
together in one batch per step (prompts included), and a ~1,000-token prefill. Greedy argmax, end
tokens ignored, as glm-inference's side runs with `ignore_eos`. Prints one JSON object."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp as L
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inputs  # noqa: E402


class Bench:
    def __init__(self, path, threads):
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp cannot load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.threads = threads
        self.batch = L.llama_batch_init(4096, 0, 64)

    def context(self, n_ctx, n_seq):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 2048, 512, n_seq
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = True
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit("llama.cpp cannot create a context")
        return ctx

    def tokenize(self, text):
        raw = text.encode()
        buf = (L.llama_token * 16384)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, True)
        return list(buf[:n])

    def decode(self, ctx, items):
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (t, p, s, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, want
            b.seq_id[i][0] = s
        if L.llama_decode(ctx, b) != 0:
            raise SystemExit("llama_decode failed")

    def argmax(self, ctx, i):
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))))


def chat_text():
    return f"<|im_start|>user\n{inputs.CHAT_PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def decode_rate(bench, steps):
    prompt = bench.tokenize(chat_text())
    ctx = bench.context(2048, 1)
    bench.decode(ctx, [(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
    tok, pos, start = bench.argmax(ctx, len(prompt) - 1), len(prompt), time.perf_counter()
    for _ in range(steps):
        bench.decode(ctx, [(tok, pos, 0, True)])
        tok, pos = bench.argmax(ctx, 0), pos + 1
    rate = steps / (time.perf_counter() - start)
    L.llama_free(ctx)
    return rate


def streams_rate(bench, n, steps):
    prompt = bench.tokenize(chat_text())
    ctx = bench.context(n * (len(prompt) + steps + 8), n)
    start = time.perf_counter()
    items = [(t, p, s, p == len(prompt) - 1) for s in range(n) for p, t in enumerate(prompt)]
    bench.decode(ctx, items)
    toks = [bench.argmax(ctx, s * len(prompt) + len(prompt) - 1) for s in range(n)]
    pos = len(prompt)
    for step in range(steps - 1):
        bench.decode(ctx, [(toks[s], pos, s, True) for s in range(n)])
        toks = [bench.argmax(ctx, s) for s in range(n)]
        pos += 1
    rate = n * steps / (time.perf_counter() - start)
    L.llama_free(ctx)
    return rate


def prefill_rate(bench):
    prompt = bench.tokenize(inputs.long_prompt())
    ctx = bench.context(2048, 1)
    start = time.perf_counter()
    bench.decode(ctx, [(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
    bench.argmax(ctx, len(prompt) - 1)
    rate = len(prompt) / (time.perf_counter() - start)
    L.llama_free(ctx)
    return rate, len(prompt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--decode-only", action="store_true", help="only the single-stream decode row")
    args = ap.parse_args()
    bench = Bench(args.gguf, args.threads)
    decode_rate(bench, 8)  # warm-up
    med = lambda f: statistics.median(f() for _ in range(args.repeat))  # noqa: E731
    if args.decode_only:
        print(json.dumps({"decode_tok_s": med(lambda: decode_rate(bench, args.decode_tokens))}))
        return
    result = {
        "version": L.__version__,
        "system_info": L.llama_print_system_info().decode(errors="replace"),
        "decode_tok_s": med(lambda: decode_rate(bench, args.decode_tokens)),
        "streams_tok_s": med(lambda: streams_rate(bench, args.streams, args.stream_tokens)),
    }
    pre = [prefill_rate(bench) for _ in range(args.repeat)]
    result["prefill_tok_s"] = statistics.median(r for r, _ in pre)
    result["prefill_tokens"] = pre[0][1]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
