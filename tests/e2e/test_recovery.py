"""kube-apiserver restarted under a running controller and gateway: both recover in place (same
processes, new watches), keep routing meanwhile, and do not spin while the API is away."""

import subprocess
import threading

from conftest import lease_holder
from kube import MINILM, ROOT, condition_is, http_json, metric, unique, wait_until

# Served names unique to this run (the gateway routes every namespace).
BEFORE, AFTER = unique("before"), unique("after")


def embedding_model(name: str, served: str) -> dict:
    return {"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": name},
            "spec": {"name": served, "task": "embedding", "source": "/models/minilm"}}


def reconciles(controller) -> float:
    return metric(controller.metrics(), "glm_operator_reconciliations_total")


def listed(gateway) -> set[str]:
    return {m["id"] for m in http_json(f"{gateway.base}/v1/models")[1]["data"]}


def test_an_api_server_restart_is_survived_in_place(k, api, host, namespace):
    ns = namespace("e2e-restart")
    # Other tests' namespaces, terminating ones included, gone first: the deletion of their models,
    # Deployments and pods triggers reconciles that the bound below must not count.
    wait_until("earlier tests' namespaces deleted",
               lambda: not [n["metadata"]["name"] for n in api.items("/api/v1/namespaces")
                            if n["metadata"]["name"].startswith("e2e-") and n["metadata"]["name"] != ns])
    backend = host.inference((BEFORE, MINILM))
    controller = host.controller()
    wait_until("leading", lambda: lease_holder(api) == controller.identity)
    gateway = host.gateway({f"before.{ns}.svc.cluster.local:8200": backend})
    k.apply(embedding_model("before", BEFORE), ns)
    wait_until("routed", lambda: BEFORE in listed(gateway))

    # Requests through the gateway while the API server is down: answered from the last table.
    answers, halt = [], threading.Event()

    def traffic():
        while not halt.is_set():
            answers.append(http_json(f"{gateway.base}/v1/embeddings", {"model": BEFORE, "input": "x"})[0])
            halt.wait(0.1)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    before = reconciles(controller)
    restart = subprocess.run([str(ROOT / "scripts" / "cluster.sh"), "restart-apiserver"],
                             capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr
    halt.set()
    thread.join()
    assert answers and set(answers) == {200}, answers

    # Same processes; their watches came back by themselves.
    assert controller.proc.alive() and gateway.proc.alive()
    k.apply(embedding_model("after", AFTER), ns)
    wait_until("a model created after the restart reconciled",
               lambda: condition_is(api.model(ns, "after"), "Ready", "True"), timeout=180)
    wait_until("and routed", lambda: AFTER in listed(gateway), timeout=180)
    assert lease_holder(api) == controller.identity
    assert gateway.ready()

    # No hot loop: a handful of reconciles per model for the outage and the relists, not
    # hundreds (the controller's watch backoff and its per-object error backoff bound them).
    during = reconciles(controller) - before
    assert during <= 30, during
    errors = metric(controller.metrics(), "glm_operator_reconcile_errors_total")
    assert errors <= 10, errors
