"""Each example GLMModel against the real control plane: children with owner references, the pod
template as `glm-operator render` builds it, kwok-ready pods turning status Ready, Events; and
every schema bound and CEL rule enforced by the API server itself."""

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import chart_env, recycle_volumes
from kube import OPERATOR_BIN, RELEASE, ROOT, condition_is, has_event, is_subset, wait_until

EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "crds" / "examples" / name).read_text())


def rendered(path: Path, namespace: str, chart: dict) -> dict[str, dict]:
    """What `glm-operator render` builds for the example, with the chart's image settings."""
    env = {"PATH": os.environ.get("PATH", ""), **chart_env(chart[RELEASE])}
    out = subprocess.run([str(OPERATOR_BIN), "render", "-f", str(path), "-n", namespace],
                         capture_output=True, text=True, env=env, check=True)
    return {d["kind"]: d for d in yaml.safe_load_all(out.stdout)}


def model_store_claim(k, namespace: str) -> None:
    """The existing claim the GGUF example reads from (`source: pvc://model-store/...`)."""
    k.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "model-store", "namespace": namespace},
             "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "10Gi"}}}})


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_becomes_ready_with_its_children(k, api, chart, controller, namespace, path):
    ns = namespace("e2e-example")
    recycle_volumes(api, 2)
    if "pvc://model-store" in path.read_text():
        model_store_claim(k, ns)
    k.run("apply", "-n", ns, "-f", str(path))
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    spec = yaml.safe_load(path.read_text())["spec"]

    # Ready turns True with the first ready pod; the rollout is complete once every replica is
    # ready (under load kwok may report the second pod a status sync later).
    def rolled_out():
        m = api.model(ns, name)
        done = m and condition_is(m, "Ready", "True") and condition_is(m, "Progressing", "False", "Complete")
        return done and (m.get("status") or {}).get("readyReplicas") == spec["replicas"] and m

    model = wait_until(f"{name} Ready with every replica", rolled_out)
    status = model["status"]
    assert status["readyReplicas"] == spec["replicas"] == status["replicas"]
    assert status["endpoint"] == f"http://{name}.{ns}.svc.cluster.local:8200"
    assert status["observedGeneration"] == model["metadata"]["generation"]
    assert condition_is(model, "Progressing", "False", "Complete")
    assert condition_is(model, "Degraded", "False")

    # Children: exactly what render builds (server defaults aside), each owned by the model.
    built = rendered(path, ns, chart)
    live = {kind: k.get(kind, name if kind != "PersistentVolumeClaim" else f"{name}-weights", ns)
            for kind in built}
    for kind, obj in live.items():
        [owner] = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "GLMModel", name, model["metadata"]["uid"], True), kind
    template = built["Deployment"]["spec"]["template"]
    diff = is_subset(template, live["Deployment"]["spec"]["template"], "spec.template")
    assert diff is None, diff
    if spec.get("gpus", 0) > 0:
        # GPU pods run the CUDA build (they get GLM_DEVICE=cuda, which the CPU build refuses).
        image = live["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == chart_env(chart[RELEASE])["GLM_DEFAULT_CUDA_IMAGE"]
        assert image.endswith("-cuda")
        assert live["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    if "PersistentVolumeClaim" in live:
        wait_until("the weights claim Bound",
                   lambda: (k.get("pvc", f"{name}-weights", ns) or {}).get("status", {}).get("phase") == "Bound")

    # The pods the real scheduler placed and kwok "ran".
    pods = k.items("pods", ns, f"kubeglm.io/model={name}")
    assert len(pods) == spec["replicas"]
    nodes = {p["spec"]["nodeName"] for p in pods}
    if spec.get("gpus", 0) > 0:
        assert nodes <= {"glm-gpu-0", "glm-gpu-1"}, nodes
    else:
        assert nodes == {"glm-cpu-0"}, nodes

    # Events, as `kubectl get events` / `kubectl describe glm` show them.
    for reason in ("Created", "Ready"):
        wait_until(f"Event {reason}", lambda: has_event(k, ns, name, reason, "Normal"))
    described = k.run("describe", "glm", name, "-n", ns).stdout
    assert "ReplicasReady" in described and "Created" in described


BASE = {
    "apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel",
    "metadata": {"name": "qwen"},
    "spec": {"task": "chat", "source": "hf://Qwen/Qwen2.5-0.5B-Instruct@main", "cache": {"size": "20Gi"}},
}

# (change to the spec or metadata, words kubectl must print: the field and why)
REFUSED = [
    ({"source": "s3://bucket/model"}, ["spec.source", "source must be hf://"]),
    ({"source": "/models/../etc"}, ["spec.source", "source must be hf://"]),
    ({"source": ""}, ["spec.source", "at least 1 chars"]),
    ({"name": "-bad name-"}, ["spec.name", "name must be"]),
    ({"name": "a" * 129}, ["spec.name", "Too long"]),
    ({"aliases": ["ok", "not ok"]}, ["spec.aliases", "every alias"]),
    ({"aliases": [f"a{i}" for i in range(33)]}, ["spec.aliases", "must have at most 32 items"]),
    ({"gguf": "../x.gguf"}, ["spec.gguf", "gguf must be a relative path"]),
    ({"gguf": "model.bin"}, ["spec.gguf", "ending in .gguf"]),
    ({"task": "embedding", "gguf": "m.gguf"}, ["spec.gguf", "only to chat models"]),
    ({"task": "rerank"}, ["spec.task", "Unsupported value"]),
    ({"replicas": -1}, ["spec.replicas", "greater than or equal to 0"]),
    ({"replicas": 1001}, ["spec.replicas", "less than or equal to 1000"]),
    ({"gpus": -1}, ["spec.gpus", "greater than or equal to 0"]),
    ({"gpus": 2}, ["spec.gpus", "gpus must be 0 or 1"]),
    ({"gpuResourceName": "nvidia gpu"}, ["spec.gpuResourceName", "resource name"]),
    ({"image": "a b"}, ["spec.image", "image must be"]),
    ({"cache": {"size": "lots"}}, ["spec.cache.size", "quantity"]),
    ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteAlways"]}}, ["spec.cache.accessModes", "accessModes"]),
    ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteOncePod"]}, "replicas": 2},
     ["spec.replicas", "ReadWriteOncePod"]),
    ({"source": "pvc://store/qwen"}, ["spec.cache", "cache applies only to hf://"]),
    ({"replica": 2}, ["unknown field", "spec.replica"]),
    # spec.autoscaling: bounds, target and delay are checked by the API server.
    ({"autoscaling": {"minReplicas": 3, "maxReplicas": 1, "targetInFlight": 2}},
     ["spec.autoscaling.minReplicas", "must not exceed autoscaling.maxReplicas"]),
    ({"autoscaling": {"maxReplicas": 2, "targetInFlight": 0}},
     ["spec.autoscaling.targetInFlight", "must be greater than 0"]),
    ({"autoscaling": {"maxReplicas": 0, "targetInFlight": 1}},
     ["spec.autoscaling.maxReplicas", "greater than or equal to 1"]),
    ({"autoscaling": {"minReplicas": -1, "maxReplicas": 2, "targetInFlight": 1}},
     ["spec.autoscaling.minReplicas", "greater than or equal to 0"]),
    ({"autoscaling": {"maxReplicas": 2, "targetInFlight": 1, "scaleDownDelay": "5 minutes"}},
     ["spec.autoscaling.scaleDownDelay", "duration such as"]),
    ({"autoscaling": {"minReplicas": 1, "targetInFlight": 1}},
     ["spec.autoscaling.maxReplicas", "Required value"]),
    ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteOncePod"]},
      "autoscaling": {"maxReplicas": 2, "targetInFlight": 1}},
     ["spec.autoscaling.maxReplicas", "ReadWriteOncePod"]),
    ({"metadata.name": "Qwen.2"}, ["metadata.name", "DNS-1035"]),
]


@pytest.mark.parametrize("change, words", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_the_api_server_refuses_bad_specs_naming_the_field(k, chart, change, words):
    """`kubectl apply --dry-run=server`: the API server runs the whole admission and validation
    and keeps nothing."""
    ns = "default"
    bad = copy.deepcopy(BASE)
    for key, value in change.items():
        if key == "metadata.name":
            bad["metadata"]["name"] = value
        else:
            bad["spec"][key] = value
    out = k.run("apply", "-n", ns, "--dry-run=server", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert out.returncode != 0, f"accepted: {change}"
    for word in words:
        assert word in out.stderr, f"{word!r} not in {out.stderr}"
    # The same object without the change is accepted.
    ok = k.run("apply", "-n", ns, "--dry-run=server", "-f", "-", input=yaml.safe_dump(BASE), check=False)
    assert ok.returncode == 0, ok.stderr


def test_the_scale_subresource_is_bounded_too(k, api, chart, controller, namespace):
    """`kubectl scale` goes through the scale subresource: the same bounds and rules apply."""
    ns = namespace("e2e-scale-rules")
    model = copy.deepcopy(BASE)
    model["spec"]["cache"] = {"size": "1Gi", "accessModes": ["ReadWriteOncePod"]}
    model["spec"]["replicas"] = 1
    k.apply(model, ns)
    refused = k.run("scale", "glm/qwen", "-n", ns, "--replicas=2", check=False)
    assert refused.returncode != 0 and "ReadWriteOncePod" in refused.stderr, refused.stderr
    refused = k.run("scale", "glm/qwen", "-n", ns, "--replicas=5000", check=False)
    assert refused.returncode != 0 and "spec.replicas" in refused.stderr, refused.stderr
    assert api.model(ns, "qwen")["spec"]["replicas"] == 1
