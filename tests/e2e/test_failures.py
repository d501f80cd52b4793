"""What goes wrong reaches `kubectl describe glm`: the scheduler's refusal, children the API
server refuses (422, 403) and pods a quota forbids, as conditions and Warning Events."""

import copy
import json

import pytest
import yaml

from conftest import recycle_volumes
from kube import ROOT, condition, condition_is, has_event, wait_until

CPU_MODEL = yaml.safe_load((ROOT / "crds" / "examples" / "embedding-cpu.yaml").read_text())
CACHED = {
    "apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel",
    "metadata": {"name": "cached"},
    "spec": {"task": "chat", "source": "hf://Qwen/Qwen2.5-0.5B-Instruct@main", "replicas": 1,
             "cache": {"size": "10Gi"}},
}


def degraded(api, ns: str, name: str, reason: str) -> dict:
    return wait_until(f"{name} Degraded={reason}", lambda: (m := api.model(ns, name))
                      and condition_is(m, "Degraded", "True", reason) and m)


def warned(k, ns: str, name: str, reason: str) -> dict:
    return wait_until(f"Warning Event {reason}", lambda: has_event(k, ns, name, reason, "Warning"))


def test_more_gpus_than_any_node_has_is_unschedulable(k, api, chart, controller, namespace):
    ns = namespace("e2e-unschedulable")
    model = {"apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel", "metadata": {"name": "big"},
             "spec": {"task": "chat", "source": "/models/big", "gpus": 1, "gpuResourceName": "amd.com/gpu",
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}
    k.apply(model, ns)
    m = degraded(api, ns, "big", "Unschedulable")
    ready = condition(m, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    # The scheduler's own words, as the pod carries them.
    [pod] = k.items("pods", ns, "kubeglm.io/model=big")
    scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert ready["message"] == scheduled["message"]
    assert "0/3 nodes are available" in ready["message"]
    assert "Insufficient amd.com/gpu" in ready["message"]
    event = warned(k, ns, "big", "Unschedulable")
    assert "Insufficient amd.com/gpu" in event["message"]


def test_requests_above_limits_is_a_refused_deployment(k, api, chart, controller, namespace):
    ns = namespace("e2e-invalid")
    model = copy.deepcopy(CPU_MODEL)
    model["spec"]["resources"] = {"requests": {"memory": "4Gi"}, "limits": {"memory": "2Gi"}}
    k.apply(model, ns)
    m = degraded(api, ns, "minilm", "ApplyFailed")
    ready = condition(m, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ApplyFailed")
    assert 'Deployment.apps "minilm" is invalid' in ready["message"]
    assert "must be less than or equal to memory limit" in ready["message"]
    warned(k, ns, "minilm", "ApplyFailed")
    # Fixing the spec heals it: the error backoff retries, the watch brings the change at once.
    k.run("patch", "glm", "minilm", "-n", ns, "--type=merge",
          "-p", json.dumps({"spec": {"resources": {"requests": {"memory": "1Gi"}}}}))
    wait_until("Ready after the fix", lambda: condition_is(api.model(ns, "minilm"), "Ready", "True")
               and condition_is(api.model(ns, "minilm"), "Degraded", "False"))


@pytest.mark.parametrize("change, code_words", [
    # storageClassName of a bound claim is immutable: 422.
    ({"storageClassName": "fast"}, "spec is immutable after creation"),
    # Growing a claim whose class does not allow expansion: 403 from the admission plugin.
    ({"size": "20Gi"}, "forbidden"),
])
def test_a_refused_cache_change_degrades_a_serving_model(k, api, chart, controller, namespace, change, code_words):
    ns = namespace("e2e-pvc")
    recycle_volumes(api, 1)
    model = copy.deepcopy(CACHED)
    model["spec"]["cache"]["storageClassName"] = "standard"
    k.apply(model, ns)
    wait_until("Ready", lambda: condition_is(api.model(ns, "cached"), "Ready", "True"))
    wait_until("the claim Bound", lambda: k.get("pvc", "cached-weights", ns)["status"].get("phase") == "Bound")
    k.run("patch", "glm", "cached", "-n", ns, "--type=merge", "-p", json.dumps({"spec": {"cache": change}}))
    m = degraded(api, ns, "cached", "ApplyFailed")
    message = condition(m, "Degraded")["message"]
    assert "cached-weights" in message and code_words in message, message
    # The pods already running still serve: Ready stays True, Degraded says why nothing changes.
    assert condition_is(m, "Ready", "True")
    warned(k, ns, "cached", "ApplyFailed")


def test_a_quota_that_forbids_the_pods_is_failed_create(k, api, chart, controller, namespace):
    ns = namespace("e2e-quota")
    k.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
             "spec": {"hard": {"pods": "0"}}}, ns)
    wait_until("the quota counted", lambda: (q := k.get("resourcequota", "no-pods", ns))
               and "pods" in (q.get("status") or {}).get("hard", {}))
    k.apply(CPU_MODEL, ns)
    m = degraded(api, ns, "minilm", "FailedCreate")
    ready = condition(m, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "FailedCreate")
    assert "exceeded quota: no-pods" in ready["message"], ready["message"]
    event = warned(k, ns, "minilm", "FailedCreate")
    assert "exceeded quota" in event["message"]
