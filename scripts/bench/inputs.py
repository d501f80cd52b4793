"""The inputs every side of scripts/bench-peers.sh runs on, built from the fixture sentences so
that no download is needed: a short chat prompt, a ~1,000-token prompt, and a mixed-length
embedding corpus."""
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("GLM_FIXTURES_DIR", REPO.parent / "shared/fixtures"))

CHAT_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def sentences():
    return json.loads((FIXTURES / "real/minilm/reference.json").read_text())["sentences"]


def long_prompt(words=510):
    """~1,000 SmolLM2 tokens of English: the fixture sentences repeated, then a question."""
    text, ss, i = [], sentences(), 0
    while sum(len(t.split()) for t in text) < words:
        text.append(ss[i % len(ss)])
        i += 1
    return " ".join(text) + "\n\nSummarise the text above in one sentence."


def embed_corpus():
    """48 inputs of 1 to 6 fixture sentences each (about 8 to 130 tokens), in a fixed order that
    mixes lengths, as a search index's documents and queries do."""
    ss = sentences()
    out = []
    for i in range(48):
        k = 1 + (i * 7) % 6
        start = (i * 5) % len(ss)
        out.append(" ".join(ss[(start + j) % len(ss)] for j in range(k)))
    return out


def batches(corpus, size):
    """`len(corpus)` batches of `size` inputs, cycling through the corpus."""
    n = len(corpus)
    return [[corpus[(b * size + j) % n] for j in range(size)] for b in range(n)]


def sentences_per_second(embed, size, secs, repeat):
    """Median over `repeat` runs of sentences/s of `embed(list of texts) -> count`, cycling through
    the batches of `size` for `secs` seconds each run (after one warm-up batch)."""
    import statistics
    import time
    batches_ = batches(embed_corpus(), size)
    embed(batches_[0])
    rates = []
    for _ in range(repeat):
        done, start = 0, time.perf_counter()
        for b in batches_:
            done += embed(b)
            if time.perf_counter() - start >= secs:
                break
        rates.append(done / (time.perf_counter() - start))
    return statistics.median(rates)
