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
    | grants("kubeglm.io", ["glmmodels/scale"], ["patch"])
    | grants("apps", ["deployments"], ["get", "list", "watch", "create", "patch"])
    | grants("", ["services", "persistentvolumeclaims"], ["get", "list", "watch", "create", "patch"])
    | grants("", ["pods"], ["list", "watch"])
    | grants("events.k8s.io", ["events"], ["create", "patch"])
    | grants("monitoring.coreos.com", ["servicemonitors"], ["get", "create", "patch"])
)
SERVICE_MONITOR_GRANTS = grants("monitoring.coreos.com", ["servicemonitors"], ["get", "create", "patch"])
AUTOSCALER_GRANTS = grants("kubeglm.io", ["glmmodels/scale"], ["patch"])
# In the release namespace: the gateway Service's EndpointSlices list the replicas to scrape.
AUTOSCALER_DISCOVERY_GRANTS = grants("discovery.k8s.io", ["endpointslices"], ["list"])


GATEWAY_GRANTS = (
    grants("kubeglm.io", ["glmmodels"], ["get", "list", "watch"])
    | grants("kubeglm.io", ["glmmodels/scale"], ["get", "patch"])
    | grants("discovery.k8s.io", ["endpointslices"], ["list", "watch"])
)


def named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in by_kind(docs, kind)}


def env_of(deployment: dict) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_default_rbac_is_cluster_wide_and_least_privilege():
    docs = render()
    roles = named(docs, "ClusterRole")
    assert set(roles) == {"glm-glm-operator", "glm-glm-operator-gateway"}
    assert rules_of(roles["glm-glm-operator"]) == EXPECTED_OPERATOR_GRANTS
    # The gateway reads GLMModels and EndpointSlices and scales from zero, with its own
    # ServiceAccount.
    assert rules_of(roles["glm-glm-operator-gateway"]) == GATEWAY_GRANTS
    bindings = named(docs, "ClusterRoleBinding")
    for name, binding in bindings.items():
        assert binding["roleRef"]["name"] == name
    assert bindings["glm-glm-operator-gateway"]["subjects"][0]["name"] == "glm-glm-operator-gateway"
    assert bindings["glm-glm-operator"]["subjects"][0]["name"] == "glm-glm-operator"
    namespaced = named(docs, "Role")
    assert set(namespaced) == {"glm-glm-operator-leader-election", "glm-glm-operator-autoscaler"}
    lease_role = namespaced["glm-glm-operator-leader-election"]
    assert lease_role["metadata"]["namespace"] == "glm-system"
    discovery = namespaced["glm-glm-operator-autoscaler"]
    assert discovery["metadata"]["namespace"] == "glm-system"
    assert rules_of(discovery) == AUTOSCALER_DISCOVERY_GRANTS
    assert named(docs, "RoleBinding")["glm-glm-operator-autoscaler"]["subjects"][0]["name"] == "glm-glm-operator"
    assert rules_of(lease_role) == grants("coordination.k8s.io", ["leases"], ["get", "create", "update"])
    narrowed = [r for r in lease_role["rules"] if "get" in r["verbs"] or "update" in r["verbs"]]
    assert narrowed and all(r.get("resourceNames") == ["glm-operator-leader"] for r in narrowed)
    deployments = named(docs, "Deployment")
    assert env_of(deployments["glm-glm-operator"])["GLM_LEASE_NAME"] == "glm-operator-leader"
    every_rule = [r for role in [*roles.values(), *namespaced.values()] for r in role["rules"]]
    assert all("*" not in str(rule) for rule in every_rule)


def test_watch_namespace_switches_to_namespaced_rbac():
    docs = render("watchNamespace=ml-models")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(docs, "Role")}
    assert set(roles) == {("ml-models", "glm-glm-operator"), ("ml-models", "glm-glm-operator-gateway"),
                          ("glm-system", "glm-glm-operator-leader-election"),
                          ("glm-system", "glm-glm-operator-autoscaler")}
    assert rules_of(roles[("ml-models", "glm-glm-operator")]) == EXPECTED_OPERATOR_GRANTS
    assert rules_of(roles[("ml-models", "glm-glm-operator-gateway")]) == GATEWAY_GRANTS
    bindings = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in by_kind(docs, "RoleBinding")}
    assert bindings[("ml-models", "glm-glm-operator")]["subjects"] == [
        {"kind": "ServiceAccount", "name": "glm-glm-operator", "namespace": "glm-system"}
    ]
    deployments = named(docs, "Deployment")
    assert env_of(deployments["glm-glm-operator"])["GLM_WATCH_NAMESPACE"] == "ml-models"
    assert env_of(deployments["glm-glm-operator-gateway"])["GLM_GATEWAY_NAMESPACE"] == "ml-models"


def test_model_service_monitors_never_drops_their_grant():
    docs = render("modelServiceMonitors=never")
    role = named(docs, "ClusterRole")["glm-glm-operator"]
    assert rules_of(role) == EXPECTED_OPERATOR_GRANTS - SERVICE_MONITOR_GRANTS
    assert env_of(named(docs, "Deployment")["glm-glm-operator"])["GLM_SERVICE_MONITOR"] == "never"


def test_leader_election_off_drops_the_lease_role():
    docs = render("controller.leaderElection.enabled=false")
    assert set(named(docs, "Role")) == {"glm-glm-operator-autoscaler"}


def test_the_autoscaler_is_configured_from_values_and_off_drops_its_grants():
    env = env_of(named(render(), "Deployment")["glm-glm-operator"])
    assert (env["GLM_AUTOSCALER"], env["GLM_AUTOSCALER_INTERVAL"], env["GLM_AUTOSCALER_WINDOW"],
            env["GLM_AUTOSCALER_SCRAPE_TIMEOUT"]) == ("true", "10", "60", "5")
    # The replicas to scrape are the gateway Service's, whatever it is named.
    env = env_of(named(render("gateway.service.name=llm"), "Deployment")["glm-glm-operator"])
    assert env["GLM_AUTOSCALER_GATEWAY_SERVICE"] == "llm"
    docs = render("controller.autoscaler.enabled=false")
    assert rules_of(named(docs, "ClusterRole")["glm-glm-operator"]) == EXPECTED_OPERATOR_GRANTS - AUTOSCALER_GRANTS
    assert "glm-glm-operator-autoscaler" not in named(docs, "Role")
    assert env_of(named(docs, "Deployment")["glm-glm-operator"])["GLM_AUTOSCALER"] == "false"


def test_network_policies_let_the_autoscaler_scrape_the_gateways():
    docs = render("networkPolicy.enabled=true", "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ml")
    policies = named(docs, "NetworkPolicy")
    egress = policies["glm-glm-operator-controller"]["spec"]["egress"]
    assert {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "glm-operator",
                                                    "app.kubernetes.io/instance": "glm",
                                                    "app.kubernetes.io/component": "gateway"}}}],
            "ports": [{"port": 8080, "protocol": "TCP"}]} in egress, egress
    ingress = policies["glm-glm-operator-gateway"]["spec"]["ingress"]
    assert any(rule.get("from", [{}])[0].get("podSelector") for rule in ingress), ingress


def test_two_deployments_hardened_and_probed():
    deployments = named(render(), "Deployment")
    assert set(deployments) == {"glm-glm-operator", "glm-glm-operator-gateway"}
    expected = {"glm-glm-operator": ("controller", {"metrics": 9090}, "/health"),
                "glm-glm-operator-gateway": ("gateway", {"gateway": 8080}, "/ready")}
    for name, deployment in deployments.items():
        command, ports, readiness = expected[name]
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["args"][0] == command
        assert pod["securityContext"]["runAsNonRoot"] is True
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
        assert container["readinessProbe"]["httpGet"]["path"] == readiness
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == command
    env = env_of(deployments["glm-glm-operator"])
    assert env["GLM_DEFAULT_IMAGE"] == "ghcr.io/kubeglm/glm-inference:0.1.0"
    assert env["GLM_DEFAULT_CUDA_IMAGE"] == "ghcr.io/kubeglm/glm-inference:0.1.0-cuda"


def test_gateway_drains_within_its_grace_period():
    [gateway] = [d for d in by_kind(render("gateway.shutdownDelaySeconds=7", "gateway.drainTimeoutSeconds=120"),
                                    "Deployment") if d["metadata"]["name"].endswith("-gateway")]
    env = env_of(gateway)
    assert (env["GLM_GATEWAY_SHUTDOWN_DELAY"], env["GLM_GATEWAY_DRAIN_TIMEOUT"]) == ("7", "120")
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 7 + 120 + 10
    assert gateway["spec"]["replicas"] == 2


def test_gateway_routing_flags_and_api_key_secret():
    docs = render("gateway.maxAttempts=5", "gateway.holdTimeoutSeconds=60", "gateway.maxHeld=10",
                  "gateway.apiKeys.secretName=openai-keys")
    [gateway] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-gateway")]
    env = env_of(gateway)
    assert (env["GLM_GATEWAY_MAX_ATTEMPTS"], env["GLM_GATEWAY_HOLD_TIMEOUT"], env["GLM_GATEWAY_MAX_HELD"]) == ("5", "60", "10")
    assert env["GLM_GATEWAY_API_KEYS_SECRET"] == "glm-system/openai-keys"
    role = named(docs, "Role")["glm-glm-operator-gateway-api-keys"]
    assert role["metadata"]["namespace"] == "glm-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["openai-keys"],
                              "verbs": ["get", "list", "watch"]}]
    binding = named(docs, "RoleBinding")["glm-glm-operator-gateway-api-keys"]
    assert binding["subjects"][0]["name"] == "glm-glm-operator-gateway"
    assert "GLM_GATEWAY_API_KEYS_SECRET" not in env_of(
        [d for d in by_kind(render(), "Deployment") if d["metadata"]["name"].endswith("-gateway")][0])


def test_gateway_service_is_glm_gateway_on_the_gateway_pods():
    docs = render()
    gateway = named(docs, "Service")["glm-gateway"]
    assert gateway["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "gateway", "protocol": "TCP"}]
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in named(docs, "Deployment").items()}
    selects = {name for name, labels in pods.items()
               if all(labels.get(k) == v for k, v in gateway["spec"]["selector"].items())}
    assert selects == {"glm-glm-operator-gateway"}


def test_pod_disruption_budgets_never_block_a_drain():
    pdbs = named(render(), "PodDisruptionBudget")
    assert set(pdbs) == {"glm-glm-operator-controller", "glm-glm-operator-gateway"}
    for pdb in pdbs.values():
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert not by_kind(render("podDisruptionBudget.enabled=false"), "PodDisruptionBudget")


def test_network_policies_are_optional_and_scoped():
    assert not by_kind(render(), "NetworkPolicy")
    policies = named(render("networkPolicy.enabled=true",
                            "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ml"), "NetworkPolicy")
    gateway = policies["glm-glm-operator-gateway"]["spec"]
    assert gateway["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert gateway["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    to_models = [rule for rule in gateway["egress"] if "to" in rule]
    assert to_models[0]["ports"] == [{"port": 8200, "protocol": "TCP"}]
    controller = policies["glm-glm-operator-controller"]["spec"]
    # DNS, the API, and (the autoscaler) the gateway pods' /metrics.
    to_pods = [rule for rule in controller["egress"] if "to" in rule]
    assert [r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in to_pods] == ["gateway"]


@pytest.mark.parametrize("bad", [
    "replicaCount=2",                       # the old top-level key: refused, not silently ignored
    "gateway.replicaCount=-1",
    "modelServiceMonitors=sometimes",
    "inferenceImage=has space",
    "watchNamespace=Not_A_Namespace",
    "gateway.port=70000",
])
def test_values_schema_refuses_bad_values(bad):
    helm = require(HELM, "run scripts/install-tools.sh")
    out = subprocess.run([str(helm), "template", "glm", str(CHART), "--set", bad], capture_output=True, text=True)
    assert out.returncode != 0, f"accepted {bad}"
    assert "values don't meet the specifications of the schema" in out.stderr or "at '" in out.stderr, out.stderr


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
    deployment = by_kind(broken, "Deployment")[0]
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
    for rel in ("charts", "manifests", "scripts/render-manifests.sh", "scripts/lib", "crds/glmmodel.yaml"):
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
        ({"gpus": 2}, "spec.gpus", "gpus must be 0 or 1"),
        ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteOncePod"]}, "replicas": 2}, "spec.replicas",
         "ReadWriteOncePod"),
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 1, "targetInFlight": 2}},
         "spec.autoscaling.minReplicas", "must not exceed"),
        ({"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "targetInFlight": 0}},
         "spec.autoscaling.targetInFlight", "greater than 0"),
        ({"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "targetInFlight": 1, "scaleDownDelay": "5min"}},
         "spec.autoscaling.scaleDownDelay", "duration such as"),
        ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteOncePod"]},
          "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "targetInFlight": 1}},
         "spec.autoscaling.maxReplicas", "ReadWriteOncePod"),
        ({"task": "embedding", "cache": {"size": "1Gi"}, "routing": {"strategy": "PrefixHash"}},
         "spec.routing.strategy", "PrefixHash applies only to chat models"),
        ({"routing": {"prefixChars": 64}}, "spec.routing.prefixChars", "only to strategy PrefixHash"),
        ({"routing": {"strategy": "LeastLoad", "prefixChars": 64}}, "spec.routing.prefixChars",
         "only to strategy PrefixHash"),
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


# --- the security scan must be able to fail ---------------------------------------------------

CHECKOV = ROOT / ".tools" / "checkov" / "bin" / "checkov"


def test_the_security_scan_catches_a_weakened_chart(tmp_path):
    """scripts/scan-chart.sh trusts checkov and the chart's justified skips: a chart that allows
    privilege escalation must still fail (the skips do not blanket the Deployments)."""
    checkov = require(CHECKOV, "run scripts/install-tools.sh")
    docs = render("securityContext.allowPrivilegeEscalation=true")
    (tmp_path / "chart.yaml").write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    out = subprocess.run([str(checkov), "--framework", "kubernetes", "--directory", str(tmp_path), "--skip-download",
                          "--skip-check", "CKV2_K8S_6", "--compact", "--quiet"], capture_output=True, text=True)
    assert out.returncode != 0, out.stdout
    assert "CKV_K8S_20" in out.stdout, out.stdout
    failed = {line.split(":")[1].strip() for line in out.stdout.splitlines() if line.startswith("Check: ")}
    assert failed == {"CKV_K8S_20"}, failed
