#!/usr/bin/env python3
"""transformers (chat, weights dequantized from the GGUF to float32, as the fixtures were made)
and sentence-transformers (embeddings) on PyTorch CPU: the rows of scripts/bench-peers.sh.
Prints one JSON object. Needs the bench venv (scripts/bench/install-peers.sh)."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inputs  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def chat(args, torch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    text = tok.apply_chat_template([{"role": "user", "content": inputs.CHAT_PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids

    def generate(batch, new):
        x = ids.repeat(batch, 1)
        return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=tok.eos_token_id)

    out = {}
    with torch.inference_mode():
        generate(1, 4)  # warm-up
        decode = []
        for _ in range(args.repeat):
            t_first, _ = timed(lambda: generate(1, 1))
            t_all, _ = timed(lambda: generate(1, args.decode_tokens + 1))
            decode.append(args.decode_tokens / (t_all - t_first))
        out["decode_tok_s"] = statistics.median(decode)
        agg = []
        for _ in range(args.repeat):
            t, _ = timed(lambda: generate(args.streams, args.stream_tokens))
            agg.append(args.streams * args.stream_tokens / t)
        out["streams_tok_s"] = statistics.median(agg)
        long_ids = tok(inputs.long_prompt(), return_tensors="pt").input_ids
        pre = []
        for _ in range(args.repeat):
            t, _ = timed(lambda: model(long_ids))
            pre.append(long_ids.shape[1] / t)
        out["prefill_tok_s"] = statistics.median(pre)
        out["prefill_tokens"] = int(long_ids.shape[1])
    return out


def embeddings(args, torch):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(args.minilm, device="cpu")
    return {str(size): inputs.sentences_per_second(lambda b: len(model.encode(b, batch_size=size)), size,
                                                   args.secs, args.repeat)
            for size in (1, 8, 32)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--minilm", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--skip-chat", action="store_true")
    args = ap.parse_args()
    import sentence_transformers
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    result = {"versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                          f"sentence-transformers {sentence_transformers.__version__}"}
    result["embeddings"] = embeddings(args, torch)
    if not args.skip_chat:
        result["chat"] = chat(args, torch)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
