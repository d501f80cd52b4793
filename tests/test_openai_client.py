"""The official `openai` client against the real `glm-inference` binary.

The binary serves SmolLM2-135M-Instruct (Q4_1 GGUF) and all-MiniLM-L6-v2 from `.models/`
(`scripts/fetch-models.sh` fetches them) on a free loopback port. Expected texts come from the
reference fixtures (transformers, float32): with quantized kernels, greedy tokens are only
guaranteed up to the first step whose greedy margin is below 0.1 (fixtures README).
"""
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("GLM_MODELS_DIR", ROOT / ".models"))
FIXTURES = Path(os.environ.get("GLM_FIXTURES_DIR", ROOT.parent / "shared" / "fixtures"))
BIN = Path(os.environ.get("GLM_INFERENCE_BIN", ROOT / "target" / "debug" / "glm-inference"))
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = MODELS / "all-MiniLM-L6-v2"
CHAT = "smollm2"
EMBED = "all-MiniLM-L6-v2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(path):
    p = FIXTURES / path
    assert p.exists(), f"{p} missing: the reference fixtures live in shared/fixtures (GLM_FIXTURES_DIR overrides)"
    return json.loads(p.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def server():
    for needed, how in [(BIN, "cargo build -p glm-inference (or set GLM_INFERENCE_BIN)"),
                        (SMOL, "./scripts/fetch-models.sh"), (MINILM, "./scripts/fetch-models.sh")]:
        assert needed.exists(), f"{needed} missing: run {how}"
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN), "--host", "127.0.0.1", "--port", str(port),
         "--model", f"{CHAT}={SMOL}", "--model", f"{EMBED}={MINILM}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server not ready after 180 s:\n{proc.stdout.read()}")
        time.sleep(0.5)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def smol_case():
    # case 2: greedy margins stay >= 0.1 for the first 10 tokens ("That's a great way to start. I'll")
    case = reference("real/smollm2/reference.json")["cases"][2]
    assert case["generated_text"].startswith("That's a great way to start.")
    return case


def test_chat_non_stream_follows_the_reference(client, smol_case):
    r = client.chat.completions.create(model=CHAT, messages=smol_case["messages"], temperature=0, max_tokens=16)
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith("That's a great way to start.")
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(smol_case["prompt_ids"])
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_joins_to_the_non_stream_text(client, smol_case):
    kwargs = dict(model=CHAT, messages=smol_case["messages"], temperature=0, max_tokens=16)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_stop_string_and_max_tokens(client, smol_case):
    r = client.chat.completions.create(model=CHAT, messages=smol_case["messages"], temperature=0,
                                       max_tokens=16, stop=[" great"])
    assert r.choices[0].message.content == "That's a"
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=CHAT, messages=smol_case["messages"], temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_seeded_sampling_repeats(client, smol_case):
    kwargs = dict(model=CHAT, messages=smol_case["messages"], temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_embeddings(client):
    ref = reference("real/minilm/reference.json")
    sentences = ref["sentences"][:3]
    r = client.embeddings.create(model=EMBED, input=sentences)
    assert [d.index for d in r.data] == [0, 1, 2]
    for got, want in zip(r.data, ref["embeddings"][:3]):
        assert len(got.embedding) == len(want)
        assert max(abs(a - b) for a, b in zip(got.embedding, want)) <= 1e-5
    assert r.usage.prompt_tokens == sum(len(t["ids"]) for t in ref["tokenization"][:3])


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_invalid_and_unsupported_fields_are_bad_requests(client):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=msgs, temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=msgs, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert "tools" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=msgs, n=2)
    assert "n" in str(e.value)
