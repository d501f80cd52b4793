"""Demand-driven replicas with every piece real: requests go through the real gateway, whose
/metrics the leading controller's autoscaler scrapes, and the replicas it decides reach the
Deployment on the real API server.

Only the model's server is a stand-in: kwok pods run nothing, so the model's Service is pointed
(`--gateway-connect-to`) at a loopback server that holds each request until the test releases it,
which makes the number of requests in flight exact. test_autoscaling.py covers the algorithm's
cases against a scripted metrics page; this module checks that the gateway's own figures drive it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import lease_holder
from kube import http_json, http_text, metric, respond, unique, wait_until

SERVED = unique("demand-e2e")
HELD = 6  # requests in flight during the burst
TARGET = 2  # targetInFlight: ceil(6 / 2) = 3 replicas = maxReplicas


class HoldingBackend:
    """Answers POST /v1/embeddings like glm-inference, but only once `release()` is called."""

    def __init__(self):
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.waiting = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with backend.lock:
                    backend.waiting += 1
                backend.released.wait(120)
                with backend.lock:
                    backend.waiting -= 1
                body = json.dumps({"object": "list", "model": SERVED,
                                   "data": [{"object": "embedding", "index": 0, "embedding": [0.0] * 4}],
                                   "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()
                respond(self, 200, body, "application/json")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"

    def held(self) -> int:
        with self.lock:
            return self.waiting

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(k, api, host):
    """A namespace, the holding backend behind its model's Service name, a real gateway, and the
    leading controller whose autoscaler scrapes that gateway every second."""
    ns = unique("e2e-demand")
    k.run("create", "namespace", ns)
    wait_until("default ServiceAccount", lambda: api.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"))
    backend = HoldingBackend()
    gateway = host.gateway({f"demand.{ns}.svc.cluster.local:8200": backend.addr})
    controller = host.controller(None, "--autoscaler-interval", "1", "--autoscaler-window", "2",
                                 "--autoscaler-scrape-timeout", "1", "--autoscaler-gateway-service=",
                                 "--autoscaler-gateway-urls", f"{gateway.base}/metrics")
    wait_until(f"{controller.identity} to lead", lambda: lease_holder(api) == controller.identity)
    yield ns, backend, gateway
    backend.close()
    k.run("delete", "namespace", ns, "--wait=false", check=False)


def replicas(api, ns: str) -> int:
    return api.model(ns, "demand")["spec"]["replicas"]


def test_requests_in_flight_at_the_gateway_scale_the_model_up_then_down(k, api, stack):
    ns, backend, gateway = stack
    k.apply({"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": "demand"},
             "spec": {"name": SERVED, "task": "embedding", "source": "/models/minilm", "replicas": 1,
                      "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetInFlight": TARGET,
                                      "scaleDownDelay": "3s"}}}, ns)
    wait_until("the gateway routes the model",
               lambda: SERVED in {m["id"] for m in http_json(f"{gateway.base}/v1/models")[1]["data"]})

    replies: list = []
    clients = [threading.Thread(target=lambda: replies.append(
        http_json(f"{gateway.base}/v1/embeddings", {"model": SERVED, "input": "hi"}, timeout=150)))
        for _ in range(HELD)]
    for c in clients:
        c.start()
    wait_until("every request held by the backend", lambda: backend.held() == HELD)
    text = http_text(f"{gateway.base}/metrics")
    assert metric(text, "glm_gateway_model_in_flight", namespace=ns, model="demand") == HELD

    # The autoscaler reads those 6 in flight from the real gateway: ceil(6 / 2) = 3.
    wait_until("scaled up to maxReplicas", lambda: replicas(api, ns) == 3)
    wait_until("the Deployment follows", lambda: (k.get("deployment", "demand", ns) or {})
               .get("spec", {}).get("replicas") == 3)

    backend.released.set()
    released = time.monotonic()
    for c in clients:
        c.join(150)
    assert len(replies) == HELD and all(code == 200 for code, _ in replies), replies
    wait_until("the gateway's in-flight gauge back to 0", lambda: metric(
        http_text(f"{gateway.base}/metrics"), "glm_gateway_model_in_flight", namespace=ns, model="demand") == 0)
    # Lower demand must last scaleDownDelay before replicas go back to minReplicas.
    wait_until("scaled back down to minReplicas", lambda: replicas(api, ns) == 1)
    assert time.monotonic() - released >= 3
