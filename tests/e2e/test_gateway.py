"""The gateway reads ready models from the real watch and routes to real glm-inference processes
(kwok pods run nothing, so each model's in-cluster endpoint is pointed at a loopback server with
the gateway's --gateway-connect-to)."""

import threading
import time

import pytest

from kube import MINILM, condition_is, http_json, http_text, metric, unique, wait_until

# Names unique to this run: the gateway routes every namespace, where other tests' models (or
# a previous run's, still being deleted) may be ready under the example's names.
EMBED = unique("minilm-e2e")
ALIAS = unique("text-embedding-e2e")


@pytest.fixture(scope="module")
def routed(k, api, host, controller):
    """Namespace with a ready embedding model whose endpoint reaches a real glm-inference, and a
    gateway started before the model exists."""
    ns = unique("e2e-gateway")
    k.run("create", "namespace", ns)
    wait_until("default ServiceAccount", lambda: api.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"))
    backend = host.inference((EMBED, MINILM))
    gateway = host.gateway({f"minilm.{ns}.svc.cluster.local:8200": backend})
    yield ns, gateway
    k.run("delete", "namespace", ns, "--wait=false", check=False)


def model(name: str, replicas: int = 1) -> dict:
    return {"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": name},
            "spec": {"name": EMBED, "aliases": [ALIAS], "task": "embedding",
                     "source": "/models/all-MiniLM-L6-v2", "replicas": replicas}}


def listed(gateway) -> set[str]:
    code, body = http_json(f"{gateway.base}/v1/models")
    assert code == 200, body
    return {m["id"] for m in body["data"]}


def test_a_model_is_routed_once_ready_and_reaches_the_real_server(k, api, routed):
    ns, gateway = routed
    assert EMBED not in listed(gateway)
    code, body = http_json(f"{gateway.base}/v1/embeddings", {"model": EMBED, "input": "hi"})
    assert code == 404 and body["error"]["code"] == "model_not_found", body

    k.apply(model("minilm"), ns)
    wait_until("the gateway lists the model", lambda: {EMBED, ALIAS} <= listed(gateway))
    assert condition_is(api.model(ns, "minilm"), "Ready", "True")
    # Through the alias, answered by glm-inference itself (384 dimensions: all-MiniLM-L6-v2),
    # which knows the model by its served name only.
    code, body = http_json(f"{gateway.base}/v1/embeddings",
                           {"model": ALIAS, "input": ["hello", "world"]})
    assert code == 200, body
    assert body["model"] == EMBED
    assert [len(d["embedding"]) for d in body["data"]] == [384, 384]
    # The seed's routes too.
    code, body = http_json(f"{gateway.base}/tokenize", {"model": EMBED, "prompt": "hello world"})
    assert code == 200 and body["tokens"] == ["[CLS]", "hello", "world", "[SEP]"], body


def ready_pods(api, ns: str, service: str) -> list[str]:
    """Ready, not terminating endpoints of the Service, as the gateway counts them."""
    slices = api.items(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                       f"kubernetes.io/service-name={service}")
    return [e["addresses"][0] for s in slices for e in s.get("endpoints") or []
            if e.get("conditions", {}).get("ready", True) and not e.get("conditions", {}).get("terminating", False)]


def test_a_request_scales_a_model_from_zero_and_is_held_until_a_pod_is_ready(k, api, routed):
    """replicas 0: the model is unlisted but routable; the first request patches the scale
    subresource 0 -> 1 with the gateway's own ServiceAccount, is held while the controller
    creates the pod and kwok makes it ready (its EndpointSlice turns ready), then reaches the
    real glm-inference behind the Service's connect-to address."""
    ns, gateway = routed
    k.apply(model("minilm"), ns)
    wait_until("routed", lambda: EMBED in listed(gateway))
    k.run("scale", "glm/minilm", "-n", ns, "--replicas=0")
    wait_until("ScaledToZero", lambda: condition_is(api.model(ns, "minilm"), "Ready", "False", "ScaledToZero"))
    wait_until("unlisted", lambda: EMBED not in listed(gateway))
    wait_until("no ready pod left", lambda: not ready_pods(api, ns, "minilm"))
    time.sleep(1)  # the gateway's EndpointSlice watch sees what the API server just said

    answer: dict = {}
    held = threading.Thread(target=lambda: answer.update(
        reply=http_json(f"{gateway.base}/v1/embeddings", {"model": ALIAS, "input": "hi"}, timeout=240)))
    held.start()
    wait_until("the gateway scaled the model to 1",
               lambda: api.model(ns, "minilm")["spec"]["replicas"] == 1)
    held.join(240)
    assert not held.is_alive(), "the held request never completed"
    code, body = answer["reply"]
    assert code == 200, body
    assert body["model"] == EMBED and len(body["data"][0]["embedding"]) == 384
    text = http_text(f"{gateway.base}/metrics")
    assert metric(text, "glm_gateway_scale_from_zero_total", namespace=ns, model="minilm", outcome="ok") == 1
    assert metric(text, "glm_gateway_model_held", namespace=ns, model="minilm") == 0
    assert metric(text, "glm_gateway_model_requests_total", namespace=ns, model="minilm") >= 1
    wait_until("listed again", lambda: EMBED in listed(gateway))


def test_a_gateway_is_ready_only_once_it_knows_the_models(k, host, routed):
    """/ready turns 200 only after the first full list: a new gateway (a rollout's new pod)
    already routes every ready model the moment the Service sends it traffic."""
    ns, first = routed
    k.apply(model("minilm"), ns)
    wait_until("routed by the first gateway", lambda: EMBED in listed(first))
    second = host.gateway(name=unique("e2e-gateway-late"))
    code, body = http_json(f"{second.base}/ready")
    assert code == 200 and body["ready_models"] >= 2, body
    assert {EMBED, ALIAS} <= listed(second)
