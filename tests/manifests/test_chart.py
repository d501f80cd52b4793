"""Tests of the Helm chart, the rendered manifests' drift check and the manifest validator.

Run: scripts/install-tools.sh && .venv/bin/python -m pytest tests/manifests
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"
CHART = ROOT / "charts" / "glm-operator"
CRD = ROOT / "crds" / "glmmodel.yaml"

sys.path.insert(0, str(Path(__file__).parent))
import validate_manifests  # noqa: E402


def require(path: Path, how: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: {how}")
    return path


def render(*sets: str) -> list[dict]:
    helm = require(HELM, "run scripts/install-tools.sh")
    args = [str(helm), "template", "glm", str(CHART), "--namespace", "glm-system", "--skip-crds"]
    for value in sets:
        args += ["--set", value]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    """Flatten rules into (apiGroup, resource, verb) grants."""
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def grants(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources for v in verbs}


EXPECTED_OPERATOR_GRANTS = (
    grants("kubeglm.io", ["glmmodels"], ["get", "list", "watch"])
    | grants("kubeglm.io", ["glmmodels/status"], ["patch"])
    | grants("apps", ["deployments"], ["get", "list", "watch", "create", "patch"])
    | grants("", ["services", "persistentvolumeclaims"], ["get", "list", "watch", "create", "patch"])
    | grants("", ["pods"], ["list", "watch"])
    | grants("events.k8s.io", ["events"], ["create", "patch"])
    | grants("monitoring.coreos.com", ["servicemonitors"], ["get", "create", "patch"])
)
SERVICE_MONITOR_GRANTS = grants("monitoring.coreos.com", ["servicemonitors"], ["get", "create", "patch"])


def test_default_rbac_is_cluster_wide_and_least_privilege():
    docs = render()
    [cluster_role] = by_kind(docs, "ClusterRole")
    assert rules_of(cluster_role) == EXPECTED_OPERATOR_GRANTS
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    [lease_role] = by_kind(docs, "Role")
    assert lease_role["metadata"]["namespace"] == "glm-system"
    assert rules_of(lease_role) == grants("coordination.k8s.io", ["leases"], ["get", "create", "update"])
    named = [r for r in lease_role["rules"] if "get" in r["verbs"] or "update" in r["verbs"]]
    assert named and all(r.get("resourceNames") == ["glm-operator-leader"] for r in named)
    [deployment] = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GLM_LEASE_NAME"] == "glm-operator-leader"
    assert all("*" not in str(rule) for rule in cluster_role["rules"] + lease_role["rules"])


def test_watch_namespace_switches_to_namespaced_rbac():
    docs = render("watchNamespace=ml-models")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert set(roles) == {"ml-models", "glm-system"}
    assert rules_of(roles["ml-models"]) == EXPECTED_OPERATOR_GRANTS
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")}
    assert bindings["ml-models"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "glm-glm-operator", "namespace": "glm-system"}
    ]
    [deployment] = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GLM_WATCH_NAMESPACE"] == "ml-models"
    assert env["GLM_GATEWAY_NAMESPACE"] == "ml-models"


def test_model_service_monitors_never_drops_their_grant():
    docs = render("modelServiceMonitors=never")
    [cluster_role] = by_kind(docs, "ClusterRole")
    assert rules_of(cluster_role) == EXPECTED_OPERATOR_GRANTS - SERVICE_MONITOR_GRANTS
    [deployment] = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GLM_SERVICE_MONITOR"] == "never"


def test_leader_election_off_drops_the_lease_role():
    docs = render("leaderElection.enabled=false")
    assert not by_kind(docs, "Role")


def test_deployment_is_hardened_and_probed():
    [deployment] = by_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][0] == "run"
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gateway": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in ports
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GLM_DEFAULT_IMAGE"].startswith("ghcr.io/kubeglm/glm-inference:")


def test_gateway_service_is_glm_gateway_on_the_gateway_port():
    services = {s["metadata"]["name"]: s for s in by_kind(render(), "Service")}
    gateway = services["glm-gateway"]
    assert gateway["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "gateway", "protocol": "TCP"}]
    [deployment] = by_kind(render(), "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in gateway["spec"]["selector"].items())


def test_service_monitor_only_when_enabled():
    assert not by_kind(render(), "ServiceMonitor")
    [monitor] = by_kind(render("serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom"), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics", "http"}


# --- the validator must be able to fail -------------------------------------------------------


def write(tmp_path: Path, name: str, docs: list[dict]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    return path


def test_validator_accepts_the_chart_and_rejects_an_unknown_field(tmp_path):
    docs = render("serviceMonitor.enabled=true")
    good = validate_manifests.run([write(tmp_path, "good.yaml", docs)], [], "1.33.0", quiet=True)
    assert good.failed == [] and good.passed == len(docs) - 1
    assert len(good.skipped) == 1  # the ServiceMonitor, reported, not passed

    broken = copy.deepcopy(docs)
    [deployment] = by_kind(broken, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo'd field
    bad = validate_manifests.run([write(tmp_path, "bad.yaml", broken)], [], "1.33.0", quiet=True)
    assert len(bad.failed) == 1 and "Deployment" in bad.failed[0]


def test_validator_fails_unknown_custom_kinds(tmp_path):
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    report = validate_manifests.run([write(tmp_path, "w.yaml", [doc])], [], "1.33.0", quiet=True)
    assert len(report.failed) == 1


def test_validator_checks_glmmodels_against_the_crd(tmp_path):
    crd = require(CRD, "generate it: cargo run -p glm-crds --bin crdgen > crds/glmmodel.yaml")
    model = {
        "apiVersion": "kubeglm.io/v1alpha1",
        "kind": "GLMModel",
        "metadata": {"name": "bge-m3", "namespace": "ml"},
        "spec": {"task": "embedding", "source": "hf://BAAI/bge-m3", "replicas": 1},
    }
    ok = validate_manifests.run([write(tmp_path, "ok.yaml", [model])], [crd], "1.33.0", quiet=True)
    assert ok.failed == [] and ok.passed == 1

    cases = {
        "unknown field": ("spec", {**model["spec"], "replica": 2}),
        "bad enum": ("spec", {**model["spec"], "task": "rerank"}),
        "wrong type": ("spec", {**model["spec"], "replicas": "two"}),
        "missing required": ("spec", {"task": "chat"}),
        "wrong version": ("apiVersion", "kubeglm.io/v9"),
    }
    for case, (key, value) in cases.items():
        bad = {**model, key: value}
        report = validate_manifests.run([write(tmp_path, "bad.yaml", [bad])], [crd], "1.33.0", quiet=True)
        assert len(report.failed) == 1, case


# --- drift check ------------------------------------------------------------------------------


def copy_tree_for_render(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for rel in ("charts", "manifests", "scripts/render-manifests.sh", "crds/glmmodel.yaml"):
        src = require(ROOT / rel, "run scripts/render-manifests.sh (and commit the result)")
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return repo


def render_check(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / "scripts" / "render-manifests.sh"), "--check"],
        capture_output=True,
        text=True,
        env={"HELM": str(require(HELM, "run scripts/install-tools.sh")), "PATH": "/usr/bin:/bin"},
    )


def test_committed_manifests_match_the_chart():
    repo_check = subprocess.run(
        ["bash", str(ROOT / "scripts" / "render-manifests.sh"), "--check"],
        capture_output=True, text=True,
    )
    assert repo_check.returncode == 0, repo_check.stdout + repo_check.stderr


@pytest.mark.parametrize(
    "edited",
    ["manifests/glm-operator.yaml", "manifests/glmmodel-crd.yaml", "charts/glm-operator/crds/glmmodel.yaml",
     "charts/glm-operator/values.yaml", "crds/glmmodel.yaml"],
)
def test_render_check_detects_drift(tmp_path, edited):
    repo = copy_tree_for_render(tmp_path)
    assert render_check(repo).returncode == 0
    path = repo / edited
    text = path.read_text(encoding="utf-8")
    if edited.endswith("values.yaml"):
        text = text.replace("replicaCount: 1", "replicaCount: 3")
    else:
        text += "# drift\n"
    path.write_text(text, encoding="utf-8")
    result = render_check(repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DRIFT" in result.stderr


# --- CEL rules of the CRD, evaluated offline -----------------------------------------------------

CEL_MODEL = {
    "apiVersion": "kubeglm.io/v1alpha1",
    "kind": "GLMModel",
    "metadata": {"name": "qwen", "namespace": "ml"},
    "spec": {"task": "chat", "source": "hf://Qwen/Qwen2.5-0.5B-Instruct@main", "cache": {"size": "20Gi"}},
}


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"source": "s3://bucket/model"}, "spec.source", "source must be hf://"),
        ({"source": "/models/../etc"}, "spec.source", "source must be hf://"),
        ({"name": "-bad name-"}, "spec.name", "name must be"),
        ({"aliases": ["ok", "not ok"]}, "spec.aliases", "every alias"),
        ({"gguf": "../x.gguf"}, "spec.gguf", "gguf must be a relative path"),
        ({"gguf": "model.bin"}, "spec.gguf", "ending in .gguf"),
        ({"task": "embedding", "gguf": "m.gguf"}, "spec.gguf", "only to chat models"),
        ({"gpuResourceName": "nvidia gpu"}, "spec.gpuResourceName", "resource name"),
        ({"image": "a b"}, "spec.image", "image must be"),
        ({"cache": {"size": "lots"}}, "spec.cache.size", "quantity"),
        ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteAlways"]}}, "spec.cache.accessModes", "accessModes"),
        ({"source": "pvc://store/qwen"}, "spec.cache", "cache applies only to hf://"),
    ],
)
def test_cel_rules_refuse_bad_specs_naming_the_field(tmp_path, change, field, words):
    crd = require(CRD, "generate it: cargo run -p glm-crds --bin crdgen > crds/glmmodel.yaml")
    ok = validate_manifests.run([write(tmp_path, "ok.yaml", [CEL_MODEL])], [crd], "1.33.0", quiet=True)
    assert ok.failed == [], "the base model must pass"
    bad = copy.deepcopy(CEL_MODEL)
    bad["spec"].update(change)
    schemas = validate_manifests.CrdSchemas(next(d for d in validate_manifests.load_documents(crd)))
    with pytest.raises(validate_manifests.jsonschema.ValidationError) as refused:
        schemas.validate(bad)
    reasons = refused.value.message.split("; ")
    assert any(r.startswith(f"{field}: Invalid value:") and words in r for r in reasons), reasons


def test_cel_rule_on_the_object_name():
    crd = require(CRD, "generate it: cargo run -p glm-crds --bin crdgen > crds/glmmodel.yaml")
    schemas = validate_manifests.CrdSchemas(next(d for d in validate_manifests.load_documents(crd)))
    bad = copy.deepcopy(CEL_MODEL)
    bad["metadata"]["name"] = "Qwen.2"
    with pytest.raises(validate_manifests.jsonschema.ValidationError) as refused:
        schemas.validate(bad)
    assert "DNS-1035" in refused.value.message
