"""The autoscaler on the real API server: a leading controller scrapes gateway metrics and moves
`spec.replicas` of models with `spec.autoscaling` through the scale subresource; the controller
then sizes the Deployment (kwok runs the pods).

The gateway replicas are stood in for by a small HTTP server serving the scrape contract: the
per-model series `glm_gateway_model_in_flight`, `glm_gateway_model_held` (gauges) and
`glm_gateway_model_requests_total` (counter) in the Prometheus text format, labelled with the
GLMModel's namespace and name. Short intervals and delays come from flags and the spec; every
timing assertion is a lower bound the algorithm guarantees (never "within N seconds" beyond the
generous DEADLINE)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import lease_holder
from kube import has_event, http_text, metric, respond, wait_until

INTERVAL, WINDOW = 1, 2


class FakeGateway:
    """A gateway replica's /metrics with figures the test sets."""

    def __init__(self):
        self.lock = threading.Lock()
        self.figures: dict[tuple[str, str], dict[str, float]] = {}
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                respond(self, 200 if self.path == "/metrics" else 404, gateway.render().encode(),
                        "text/plain; version=0.0.4")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def set(self, ns: str, name: str, **values: float) -> None:
        with self.lock:
            f = self.figures.setdefault((ns, name), {"in_flight": 0, "held": 0, "requests": 0})
            f.update(values)

    def arrive(self, ns: str, name: str) -> None:
        """One more request received (the counter moves)."""
        with self.lock:
            f = self.figures.setdefault((ns, name), {"in_flight": 0, "held": 0, "requests": 0})
            f["requests"] += 1

    def render(self) -> str:
        lines = []
        with self.lock:
            for series, key in [("glm_gateway_model_in_flight", "in_flight"),
                                ("glm_gateway_model_held", "held"),
                                ("glm_gateway_model_requests_total", "requests")]:
                kind = "counter" if series.endswith("_total") else "gauge"
                lines.append(f"# TYPE {series} {kind}")
                for (ns, name), f in sorted(self.figures.items()):
                    lines.append(f'{series}{{namespace="{ns}",model="{name}"}} {f[key]}')
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gateway():
    g = FakeGateway()
    yield g
    g.close()


@pytest.fixture(scope="module")
def autoscaler(host, api, gateway):
    """The leading controller, its autoscaler scraping the fake gateway every second (no
    EndpointSlice discovery: the chart's gateway pods are kwok's and answer nothing)."""
    c = host.controller(None, "--autoscaler-interval", str(INTERVAL), "--autoscaler-window", str(WINDOW),
                        "--autoscaler-scrape-timeout", "1", "--autoscaler-gateway-service=",
                        "--autoscaler-gateway-urls", gateway.url)
    wait_until(f"{c.identity} to lead", lambda: lease_holder(api) == c.identity)
    return c


def model(name: str, replicas: int, **autoscaling) -> dict:
    return {"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": name},
            "spec": {"task": "embedding", "source": "/models/minilm", "replicas": replicas,
                     "autoscaling": autoscaling}}


def replicas(api, ns: str, name: str) -> int:
    return api.model(ns, name)["spec"]["replicas"]


def deployment_replicas(k, ns: str, name: str) -> int | None:
    d = k.get("deployment", name, ns)
    return d and d["spec"]["replicas"]


def autoscaling_status(api, ns: str, name: str) -> dict:
    return (api.model(ns, name).get("status") or {}).get("autoscaling") or {}


def test_a_burst_scales_up_to_max_at_once_and_down_after_the_delay(k, api, autoscaler, gateway, namespace):
    ns = namespace("e2e-autoscale-up")
    k.apply(model("burst", 1, minReplicas=1, maxReplicas=3, targetInFlight=2, scaleDownDelay="5s"), ns)
    wait_until("the first decision", lambda: autoscaling_status(api, ns, "burst").get("reason") == "Steady")
    # 20 in flight / 2 per replica = 10 replicas wanted: bounded by maxReplicas.
    gateway.set(ns, "burst", in_flight=20, requests=20)
    wait_until("scaled up to maxReplicas", lambda: replicas(api, ns, "burst") == 3)
    wait_until("the Deployment follows", lambda: deployment_replicas(k, ns, "burst") == 3)
    event = wait_until("a ScaledUp Event", lambda: has_event(k, ns, "burst", "ScaledUp", "Normal"))
    assert "from 1 to 3 replicas" in event["message"], event
    status = wait_until("status", lambda: autoscaling_status(api, ns, "burst").get("desiredReplicas") == 3
                        and autoscaling_status(api, ns, "burst"))
    assert status["lastScaleTime"], status
    text = autoscaler.metrics()
    assert metric(text, "glm_operator_autoscaler_desired_replicas", namespace=ns, model="burst") == 3
    # Demand keeps wanting more: never above the bound.
    for _ in range(3):
        time.sleep(INTERVAL)
        assert replicas(api, ns, "burst") == 3

    # Load gone: down to minReplicas, but only after the delay of lower demand.
    idle_since = time.monotonic()
    gateway.set(ns, "burst", in_flight=0)
    wait_until("scaled down to minReplicas", lambda: replicas(api, ns, "burst") == 1)
    assert time.monotonic() - idle_since >= 5
    wait_until("a ScaledDown Event", lambda: has_event(k, ns, "burst", "ScaledDown", "Normal"))


def test_held_requests_are_demand(k, api, autoscaler, gateway, namespace):
    ns = namespace("e2e-autoscale-held")
    k.apply(model("held", 1, minReplicas=1, maxReplicas=4, targetInFlight=2, scaleDownDelay="1m"), ns)
    gateway.set(ns, "held", held=5, requests=5)
    # ceil(5 / 2) = 3, reached once the 2 s window holds only samples of 5.
    wait_until("scaled up for held requests", lambda: replicas(api, ns, "held") == 3)


def test_an_idle_model_scales_to_zero_only_after_a_delay_without_requests(k, api, autoscaler, gateway, namespace):
    ns = namespace("e2e-autoscale-zero")
    delay = 5
    k.apply(model("idle", 1, minReplicas=0, maxReplicas=2, targetInFlight=4, scaleDownDelay=f"{delay}s"), ns)
    wait_until("the first decision", lambda: autoscaling_status(api, ns, "idle").get("reason"))
    # Requests keep arriving (each done before the next scrape: gauges stay 0): never zero.
    stop = threading.Event()

    def traffic():
        while not stop.wait(0.2):
            gateway.arrive(ns, "idle")

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        end = time.monotonic() + 2 * delay
        while time.monotonic() < end:
            assert replicas(api, ns, "idle") == 1, "scaled to zero while requests arrived"
            time.sleep(0.5)
    finally:
        stop.set()
        sender.join()
    last_request = time.monotonic()
    wait_until("scaled to zero", lambda: replicas(api, ns, "idle") == 0)
    assert time.monotonic() - last_request >= delay
    wait_until("the Deployment follows", lambda: deployment_replicas(k, ns, "idle") == 0)
    event = wait_until("a ScaledDown Event", lambda: has_event(k, ns, "idle", "ScaledDown", "Normal"))
    assert "from 1 to 0 replicas" in event["message"], event
    assert autoscaling_status(api, ns, "idle")["desiredReplicas"] == 0

    # The gateway's 0 -> 1 for a held request is kept while the request is held.
    gateway.set(ns, "idle", held=1)
    gateway.arrive(ns, "idle")
    k.run("scale", "glm/idle", "-n", ns, "--replicas=1")
    end = time.monotonic() + 2 * delay
    while time.monotonic() < end:
        assert replicas(api, ns, "idle") == 1, "undid the 0 -> 1 of a held request"
        time.sleep(0.5)
    gateway.set(ns, "idle", held=0)
    wait_until("back to zero once idle", lambda: replicas(api, ns, "idle") == 0)


def test_models_without_autoscaling_are_left_alone(k, api, autoscaler, gateway, namespace):
    """`replicas` stays the user's (or an HPA's) when `autoscaling` is absent, whatever the load."""
    ns = namespace("e2e-autoscale-off")
    k.apply({"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": "manual"},
             "spec": {"task": "embedding", "source": "/models/minilm", "replicas": 2}}, ns)
    gateway.set(ns, "manual", in_flight=50, requests=50)
    # A model with autoscaling in the same namespace gets decided meanwhile: ticks are running.
    k.apply(model("witness", 1, minReplicas=1, maxReplicas=2, targetInFlight=1), ns)
    gateway.set(ns, "witness", in_flight=2, requests=2)
    wait_until("the witness scaled", lambda: replicas(api, ns, "witness") == 2)
    assert replicas(api, ns, "manual") == 2
    assert "autoscaling" not in (api.model(ns, "manual").get("status") or {})
    assert 'model="manual"' not in http_text(autoscaler.metrics_url)
    # Autoscaling removed: the replicas stay where they are, and its status goes.
    k.run("patch", "glm", "witness", "-n", ns, "--type=json", "-p", '[{"op": "remove", "path": "/spec/autoscaling"}]')
    wait_until("status.autoscaling cleared",
               lambda: "autoscaling" not in (api.model(ns, "witness").get("status") or {}))
    assert replicas(api, ns, "witness") == 2
