"""Two controller processes on one Lease, a gateway apart from both: kill -9 the leader and the
other takes over once the Lease goes unrenewed for its duration; SIGTERM a leader and it releases
the Lease at once. The gateway keeps serving through both, a stream included."""

import json
import signal
import threading
import time
import urllib.request

from conftest import lease_holder
from kube import MINILM, SMOL, condition_is, http_json, metric, unique, wait_until

LEASE_SECS, RENEW_SECS, RETRY_SECS = 8, 5, 1
TIMINGS = ("--lease-duration-secs", str(LEASE_SECS), "--renew-deadline-secs", str(RENEW_SECS),
           "--retry-period-secs", str(RETRY_SECS))
# Scheduling noise of a busy 2-core machine on top of the protocol's own bounds.
MARGIN = 6
# Served names unique to this run (the gateway routes every namespace).
EMBED, CHAT = unique("minilm-leader"), unique("smollm2-leader")


def embedding_model(name: str) -> dict:
    return {"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": name},
            "spec": {"name": EMBED, "task": "embedding", "source": "/models/minilm"}}


def chat_model(name: str) -> dict:
    return {"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": name},
            "spec": {"name": CHAT, "task": "chat", "source": "/models/smollm2.gguf"}}


class Traffic(threading.Thread):
    """Embedding requests through the gateway, back to back, until stopped."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.results, self.halt = base, [], threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                code, body = http_json(f"{self.base}/v1/embeddings",
                                       {"model": EMBED, "input": "still serving?"}, timeout=60)
            except OSError as err:
                code, body = None, str(err)
            self.results.append((code, body if code != 200 else None))
            self.halt.wait(0.05)

    def stop(self):
        self.halt.set()
        self.join()
        return self.results


class Stream(threading.Thread):
    """One streamed chat completion through the gateway, read to its end."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.chunks, self.error, self.first = base, [], None, threading.Event()

    def run(self):
        body = {"model": CHAT, "stream": True, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": "Count from one to fifty in words."}]}
        req = urllib.request.Request(f"{self.base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        self.chunks.append(line[6:].strip())
                        self.first.set()
        except OSError as err:
            self.error = err
        finally:
            self.first.set()


def test_leadership_moves_on_kill_and_on_sigterm_while_the_gateway_serves(k, api, host, namespace):
    ns = namespace("e2e-leader")
    backend = host.inference((EMBED, MINILM), (CHAT, SMOL))
    gateway = host.gateway({f"embed.{ns}.svc.cluster.local:8200": backend,
                            f"chat.{ns}.svc.cluster.local:8200": backend})
    a = host.controller("e2e-leader-a", *TIMINGS)
    wait_until("a leads", lambda: lease_holder(api) == "e2e-leader-a")
    b = host.controller("e2e-leader-b", *TIMINGS)
    for name, doc in [("embed", embedding_model("embed")), ("chat", chat_model("chat"))]:
        k.apply(doc, ns)
        wait_until(f"{name} Ready", lambda: condition_is(api.model(ns, name), "Ready", "True"))
    wait_until("both routed", lambda: {EMBED, CHAT} <= {m["id"] for m in http_json(f"{gateway.base}/v1/models")[1]["data"]})
    assert metric(b.metrics(), "glm_operator_leader") == 0
    assert metric(a.metrics(), "glm_operator_leader") == 1

    traffic = Traffic(gateway.base)
    traffic.start()
    stream = Stream(gateway.base)
    stream.start()
    assert stream.first.wait(120), "no first chunk"

    # kill -9: nothing is released; b waits until the Lease went unrenewed for its duration.
    killed = time.monotonic()
    a.proc.signal(signal.SIGKILL)
    chunks_at_kill = len(stream.chunks)
    a.proc.wait()
    wait_until("b leads", lambda: lease_holder(api) == "e2e-leader-b", timeout=LEASE_SECS + 30)
    takeover = time.monotonic() - killed
    # Not before the Lease could have expired (a's last renewal was at most a retry period and a
    # call before the kill), and soon after (b polls every retry period).
    assert LEASE_SECS - 3 * RETRY_SECS <= takeover <= LEASE_SECS + 2 * RETRY_SECS + MARGIN, takeover
    wait_until("b's leader gauge", lambda: metric(b.metrics(), "glm_operator_leader") == 1)
    k.apply(embedding_model("after-kill"), ns)
    wait_until("b reconciles a new model", lambda: condition_is(api.model(ns, "after-kill"), "Ready", "True"))

    # SIGTERM: the leader releases the Lease on its way out and a standby takes it at once,
    # long before the Lease would have expired.
    c = host.controller("e2e-leader-c", *TIMINGS)
    stopped = time.monotonic()
    b.proc.signal(signal.SIGTERM)
    assert b.proc.wait() == 0, b.proc.tail()
    assert lease_holder(api) in (None, "e2e-leader-c")
    wait_until("c leads", lambda: lease_holder(api) == "e2e-leader-c", timeout=LEASE_SECS)
    handover = time.monotonic() - stopped
    assert handover < LEASE_SECS, handover
    k.apply(embedding_model("after-term"), ns)
    wait_until("c reconciles a new model", lambda: condition_is(api.model(ns, "after-term"), "Ready", "True"))

    stream.join(300)
    results = traffic.stop()
    assert stream.error is None, stream.error
    assert stream.chunks and stream.chunks[-1] == b"[DONE]", stream.chunks[-3:]
    assert len(stream.chunks) > chunks_at_kill, "the stream was over before the kill"
    failures = [r for r in results if r[0] != 200]
    assert len(results) > 10 and not failures, failures[:5]
