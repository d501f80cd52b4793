#!/usr/bin/env python3
"""Assemble the JSON files of scripts/bench-peers.sh into the markdown table of issue 13."""
import json
import statistics
import sys
from pathlib import Path


def load(d, name):
    p = d / name
    return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else {}


def fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}x"


def main(d):
    d = Path(d)
    llama, hf = load(d, "llamacpp.json"), load(d, "hf.json")
    glm = {m: load(d, f"glm-{m}.json") for m in ("auto", "quantized")}
    gguf = load(d, "gguf.json")
    bw = float((d / "bandwidth.txt").read_text().strip()) if (d / "bandwidth.txt").is_file() else None
    chat = hf.get("chat", {})
    rows = []
    for key, label, goal in [("decode_tok_s", "single-stream decode, tok/s", 1.0),
                             ("streams_tok_s", "16 concurrent streams x 64 tokens, aggregate tok/s", 1.0),
                             ("prefill_tok_s", "~1,000-token prompt prefill, tok/s", 1.0)]:
        for mode in ("auto", "quantized"):
            ours = glm[mode].get(key)
            ref = llama.get(key)
            g = goal if mode == "auto" else 1 / 1.5
            met = "-" if not ours or not ref else ("yes" if ours / ref >= g else "NO")
            rows.append((f"SmolLM2-135M Q4_1, {label} (`--gguf-mode {mode}`)", fmt(ours), fmt(ref),
                         fmt(chat.get(key)) if mode == "auto" else "", ratio(ours, ref),
                         ratio(ours, chat.get(key)) if mode == "auto" else "", f">= {g:.2f}x llama.cpp: {met}"))
    st = hf.get("embeddings", {})
    for b in ("1", "8", "32"):
        ours = glm["auto"].get("embeddings", {}).get(b)
        ref = st.get(b)
        met = "-" if not ours or not ref else ("yes" if ours / ref >= 1.5 else "NO")
        rows.append((f"all-MiniLM-L6-v2, mixed-length text, batch {b}, sentences/s", fmt(ours), "", fmt(ref), "",
                     ratio(ours, ref), f">= 1.5x sentence-transformers: {met}"))
    print("| workload | glm-inference | llama.cpp | transformers / sentence-transformers | vs llama.cpp | vs transformers / s-t | goal met |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if gguf and bw:
        mb = gguf["weight_bytes"] / 1e6
        print(f"\nPhysical limit of decode: {mb:.1f} MB of weights read per token "
              f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in gguf['types'].items())}) over {bw:.1f} GB/s "
              f"measured read bandwidth = {bw * 1e3 / mb:.0f} tok/s for one stream.")
    for mode in ("auto", "quantized"):
        mem = glm[mode].get("rss_bytes")
        if mem and gguf:
            print(f"glm-inference `--gguf-mode {mode}` resident memory after the run: {mem / 1e6:.0f} MB "
                  f"(GGUF file {gguf['file_bytes'] / 1e6:.0f} MB; the process also holds the tokenizer, "
                  f"KV caches and the HTTP server)")
        rss, anon = glm[mode].get("loaded_rss_bytes"), glm[mode].get("loaded_anon_bytes")
        # Only `quantized` runs the chat model alone (`auto` also serves the embedding model).
        if rss and anon and gguf and mode == "quantized":
            f = gguf["file_bytes"]
            print(f"glm-inference `--gguf-mode {mode}` after loading, before any request: {rss / 1e6:.0f} MB resident "
                  f"({rss / f:.2f}x the file), of which {anon / 1e6:.0f} MB private anonymous memory "
                  f"({anon / f:.2f}x; the rest is the binary's pages)")
    for name, res in [("glm-inference (auto)", glm["auto"].get("streams_detail")),
                      ("llama-cpp-python server", load(d, "llamacpp-server.json") or None)]:
        if res:
            print(f"{name}, 16 concurrent streaming requests x 64 tokens: {res['tok_per_s']:.1f} tok/s, "
                  f"TTFT p50 {res['ttft_p50_ms']:.0f} ms p99 {res['ttft_p99_ms']:.0f} ms, "
                  f"ITL p50 {res['itl_p50_ms']:.1f} ms p99 {res['itl_p99_ms']:.1f} ms")
    rounds = [json.loads(line) for line in (d / "decode-rounds.jsonl").read_text().splitlines()
              if line.strip()] if (d / "decode-rounds.jsonl").is_file() else []
    if rounds:
        med = lambda xs: statistics.median(xs)  # noqa: E731
        rate = lambda r, side: r[side]["decode_tok_s"]  # noqa: E731
        print(f"\nSingle-stream decode in {len(rounds)} interleaved rounds (llama.cpp, then `auto`, then "
              f"`quantized`, seconds apart; each the median of its repeats), tok/s per round:")
        for side in ("llama", "auto", "quantized"):
            print(f"- {side}: {', '.join(f'{rate(r, side):.0f}' for r in rounds)} "
                  f"(median {med([rate(r, side) for r in rounds]):.0f})")
        for mode, goal in (("auto", 1.0), ("quantized", 1 / 1.5)):
            ratios = [rate(r, mode) / rate(r, "llama") for r in rounds]
            met = "yes" if med(ratios) >= goal else "NO"
            print(f"- `{mode}` / llama.cpp per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
                  f"median {med(ratios):.2f}x (goal >= {goal:.2f}x: {met})")
    if llama.get("version") or hf.get("versions"):
        print(f"\nPeers: llama-cpp-python {llama.get('version', '?')} ({llama.get('system_info', '')[:80]}); "
              f"{hf.get('versions', '?')}")


if __name__ == "__main__":
    main(sys.argv[1])
