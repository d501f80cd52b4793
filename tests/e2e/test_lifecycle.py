"""A model's life on the real control plane: scale, roll out, hand edits put back, deletion
through the garbage collector, and a ReadWriteOnce cache keeping replicas on one node."""

import json
import threading

import yaml

from conftest import recycle_volumes
from kube import ROOT, condition_is, has_event, wait_until

CPU_MODEL = yaml.safe_load((ROOT / "crds" / "examples" / "embedding-cpu.yaml").read_text())
GPU_MODEL = yaml.safe_load((ROOT / "crds" / "examples" / "chat-gpu.yaml").read_text())


def ready_with(api, ns: str, name: str, replicas: int) -> dict:
    def check():
        m = api.model(ns, name)
        ok = (m and condition_is(m, "Ready", "True", "ReplicasReady")
              and condition_is(m, "Progressing", "False", "Complete")
              and m["status"]["readyReplicas"] == replicas == m["status"]["replicas"]
              and m["status"]["observedGeneration"] == m["metadata"]["generation"])
        return ok and m
    return wait_until(f"{ns}/{name} Ready with {replicas} replicas", check)


def test_kubectl_scale_drives_the_deployment(k, api, chart, controller, namespace):
    ns = namespace("e2e-scale")
    k.apply(CPU_MODEL, ns)
    ready_with(api, ns, "minilm", 2)
    k.run("scale", "glm/minilm", "-n", ns, "--replicas=3")
    model = ready_with(api, ns, "minilm", 3)
    assert model["status"]["selector"] == "app.kubernetes.io/instance=minilm,app.kubernetes.io/name=glm-inference"
    assert k.get("deployment", "minilm", ns)["spec"]["replicas"] == 3
    wait_until("Event Scaled", lambda: has_event(k, ns, "minilm", "Scaled"))
    # The scale subresource reads what HPA/KEDA read.
    scale = json.loads(k.run("get", "--raw", f"/apis/kubeglm.io/v1alpha1/namespaces/{ns}/glmmodels/minilm/scale").stdout)
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (3, 3)
    assert scale["status"]["selector"] == model["status"]["selector"]


def test_a_gpu_model_rolls_out_by_recreate(k, api, chart, controller, namespace):
    ns = namespace("e2e-rollout")
    recycle_volumes(api, 1)
    k.apply(GPU_MODEL, ns)
    ready_with(api, ns, "glm-4-9b-chat", 1)
    old = {p["metadata"]["name"] for p in k.items("pods", ns, "kubeglm.io/model=glm-4-9b-chat")}
    # Recreate: the new pod is created only once the old one (and its GPU) is gone. Watch every
    # pod of the rollout and count the ones alive at the same time.
    seen_together = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            pods = api.items(f"/api/v1/namespaces/{ns}/pods", "kubeglm.io/model=glm-4-9b-chat")
            seen_together.append(len([p for p in pods if not p["metadata"].get("deletionTimestamp")]))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        k.run("patch", "glm", "glm-4-9b-chat", "-n", ns, "--type=merge",
              "-p", json.dumps({"spec": {"args": ["--max-concurrent", "4"]}}))
        wait_until("the new pod", lambda: (pods := k.items("pods", ns, "kubeglm.io/model=glm-4-9b-chat"))
                   and {p["metadata"]["name"] for p in pods}.isdisjoint(old))
        ready_with(api, ns, "glm-4-9b-chat", 1)
    finally:
        stop.set()
        watcher.join()
    assert max(seen_together) == 1, seen_together
    [pod] = k.items("pods", ns, "kubeglm.io/model=glm-4-9b-chat")
    assert pod["spec"]["containers"][0]["args"][-2:] == ["--max-concurrent", "4"]
    for reason in ("RollingOut", "RolledOut"):
        wait_until(f"Event {reason}", lambda: has_event(k, ns, "glm-4-9b-chat", reason, "Normal"))


def test_hand_edits_of_owned_fields_are_put_back(k, api, chart, controller, namespace):
    ns = namespace("e2e-revert")
    k.apply(CPU_MODEL, ns)
    ready_with(api, ns, "minilm", 2)
    deployment = k.get("deployment", "minilm", ns)
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    # Someone scales the Deployment, swaps the image and adds an annotation of their own.
    k.run("scale", "deployment/minilm", "-n", ns, "--replicas=5")
    k.run("set", "image", "deployment/minilm", "-n", ns, "inference=evil.example/glm:1")
    k.run("annotate", "deployment/minilm", "-n", ns, "team.example/owner=ml")

    def restored():
        d = k.get("deployment", "minilm", ns)
        return (d["spec"]["replicas"] == 2
                and d["spec"]["template"]["spec"]["containers"][0]["image"] == image) and d

    d = wait_until("the operator to put replicas and image back", restored)
    # Fields the operator does not own are left alone (server-side apply).
    assert d["metadata"]["annotations"]["team.example/owner"] == "ml"
    # A Service selector edit is put back too.
    k.run("patch", "service", "minilm", "-n", ns, "--type=merge",
          "-p", json.dumps({"spec": {"selector": {"app.kubernetes.io/instance": "other"}}}))
    wait_until("the Service selector back",
               lambda: k.get("service", "minilm", ns)["spec"]["selector"].get("app.kubernetes.io/instance") == "minilm")
    ready_with(api, ns, "minilm", 2)


def test_deleting_a_model_cascades_through_the_garbage_collector(k, api, chart, controller, namespace):
    ns = namespace("e2e-delete")
    recycle_volumes(api, 1)
    k.apply(GPU_MODEL, ns)
    ready_with(api, ns, "glm-4-9b-chat", 1)
    children = [("deployment", "glm-4-9b-chat"), ("service", "glm-4-9b-chat"),
                ("pvc", "glm-4-9b-chat-weights")]
    for kind, name in children:
        assert k.get(kind, name, ns), (kind, name)
    k.run("delete", "glm", "glm-4-9b-chat", "-n", ns, "--wait=false")
    for kind, name in children:
        wait_until(f"{kind}/{name} collected", lambda: k.get(kind, name, ns) is None)
    wait_until("the pods gone", lambda: not k.items("pods", ns, "kubeglm.io/model=glm-4-9b-chat"))
    assert not k.items("replicasets", ns)


def test_a_read_write_once_cache_keeps_replicas_on_one_node(k, api, chart, controller, namespace):
    """Pods on two nodes could not both attach the volume (Multi-Attach): they are co-located."""
    ns = namespace("e2e-rwo")
    recycle_volumes(api, 1)
    k.apply(GPU_MODEL, ns)
    ready_with(api, ns, "glm-4-9b-chat", 1)
    k.run("scale", "glm/glm-4-9b-chat", "-n", ns, "--replicas=3")
    ready_with(api, ns, "glm-4-9b-chat", 3)
    pods = k.items("pods", ns, "kubeglm.io/model=glm-4-9b-chat")
    assert len({p["spec"]["nodeName"] for p in pods}) == 1, [p["spec"]["nodeName"] for p in pods]
    # More than one node holds (8 GPUs each): the 9th replica is refused by the scheduler,
    # and status says so instead of "Starting".
    k.run("scale", "glm/glm-4-9b-chat", "-n", ns, "--replicas=9")
    m = wait_until("Degraded Unschedulable", lambda: (m := api.model(ns, "glm-4-9b-chat"))
                   and condition_is(m, "Degraded", "True", "Unschedulable") and m)
    message = next(c for c in m["status"]["conditions"] if c["type"] == "Degraded")["message"]
    assert "affinity" in message, message
    assert condition_is(m, "Ready", "True", "PartiallyReady")
