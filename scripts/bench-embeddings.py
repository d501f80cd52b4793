#!/usr/bin/env python3
"""Sentences per second of all-MiniLM-L6-v2 under sentence-transformers, at batch sizes 1, 8 and 32.

The reference point for `cargo bench -p glm-inference --bench embed_throughput`: same model folder,
same 24 fixture sentences cycled, same per-row time budget, tokenization included (`encode`).
Writes the figures as JSON (default <repo>/target/bench-embeddings-st.json) for the Rust bench to
print side by side. Needs `pip install sentence-transformers` (not part of CI); says so and exits 0
when it is missing.
"""
import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH_SIZES = (1, 8, 32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("GLM_MODELS_DIR", REPO / ".models"), type=Path,
                    help="models folder holding all-MiniLM-L6-v2 (env GLM_MODELS_DIR)")
    ap.add_argument("--fixtures", default=os.environ.get("GLM_FIXTURES_DIR", REPO.parent / "shared/fixtures"),
                    type=Path, help="fixtures folder (env GLM_FIXTURES_DIR)")
    ap.add_argument("--secs", type=float, default=float(os.environ.get("GLM_BENCH_SECS", 3)),
                    help="seconds per batch size (env GLM_BENCH_SECS)")
    ap.add_argument("--json", type=Path,
                    default=os.environ.get("GLM_ST_BENCH_JSON", REPO / "target/bench-embeddings-st.json"),
                    help="where to write the figures (env GLM_ST_BENCH_JSON)")
    args = ap.parse_args()

    try:
        import sentence_transformers
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed: `pip install sentence-transformers` to get the "
              "reference figures (the Rust bench then prints them side by side)")
        return 0

    model_dir = args.model / "all-MiniLM-L6-v2"
    if not (model_dir / "model.safetensors").is_file():
        print(f"{model_dir} missing: run scripts/fetch-models.sh", file=sys.stderr)
        return 1
    sentences = json.loads((args.fixtures / "real/minilm/reference.json").read_text())["sentences"]
    model = SentenceTransformer(str(model_dir), device="cpu")

    results = {}
    for batch in BATCH_SIZES:
        chunks = [list(c) for c in zip(*[itertools.islice(itertools.cycle(sentences), len(sentences) * batch)] * batch)]
        model.encode(chunks[0], batch_size=batch)  # warm-up
        done, start = 0, time.perf_counter()
        for chunk in itertools.cycle(chunks):
            done += len(model.encode(chunk, batch_size=batch))
            if time.perf_counter() - start >= args.secs:
                break
        results[str(batch)] = done / (time.perf_counter() - start)

    print(f"all-MiniLM-L6-v2, sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {len(sentences)} fixture sentences cycled, {args.secs}s per row")
    print(f"{'batch':>6} | {'sent/s':>10}")
    print(f"{'':-<6}-+-{'':-<10}")
    for batch, rate in results.items():
        print(f"{batch:>6} | {rate:>10.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "model": "all-MiniLM-L6-v2",
        "library": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "batch_sizes": results,
    }, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
