"""The chart installed with helm into the real API server: CRD, RBAC, ServiceAccounts,
Deployments; least privilege checked by the API server's own authorizer."""

import pytest

from kube import RELEASE, SYSTEM_NS, condition_is

CONTROLLER_SA = f"system:serviceaccount:{SYSTEM_NS}:glm-operator"
GATEWAY_SA = f"system:serviceaccount:{SYSTEM_NS}:glm-operator-gateway"


def test_the_crd_is_established_with_its_subresources(k, chart):
    crd = k.get("crd", "glmmodels.kubeglm.io")
    assert condition_is(crd, "Established", "True")
    assert condition_is(crd, "NamesAccepted", "True")
    [version] = crd["spec"]["versions"]
    assert set(version["subresources"]) == {"status", "scale"}
    # Structural and every CEL rule compiled: no NonStructuralSchema condition.
    assert not condition_is(crd, "NonStructuralSchema", "True")


def test_both_deployments_rolled_out_on_the_fake_nodes(k, chart):
    assert set(chart) == {RELEASE, f"{RELEASE}-gateway"}
    for name, deployment in chart.items():
        status = deployment["status"]
        assert status.get("availableReplicas") == deployment["spec"]["replicas"], name
    assert chart[f"{RELEASE}-gateway"]["spec"]["replicas"] == 2
    pdbs = {p["metadata"]["name"] for p in k.items("poddisruptionbudgets", SYSTEM_NS)}
    assert pdbs == {f"{RELEASE}-controller", f"{RELEASE}-gateway"}


def can(k, user: str, verb: str, resource: str, namespace: str = "default", name: str = "") -> bool:
    """`kubectl auth can-i`, i.e. a SubjectAccessReview answered by the API server's RBAC."""
    resource, _, subresource = resource.partition("/")
    target = f"{resource}/{name}" if name else resource
    extra = ["--subresource", subresource] if subresource else []
    out = k.run("auth", "can-i", verb, target, *extra, "-n", namespace, "--as", user, check=False)
    return out.stdout.strip() == "yes"


@pytest.mark.parametrize("verb, resource", [
    ("watch", "glmmodels.kubeglm.io"), ("patch", "glmmodels.kubeglm.io/status"),
    ("patch", "glmmodels.kubeglm.io/scale"), ("create", "deployments.apps"), ("patch", "deployments.apps"), ("patch", "services"),
    ("create", "persistentvolumeclaims"), ("watch", "pods"), ("create", "events.events.k8s.io"),
])
def test_the_controller_may_do_what_it_needs(k, chart, verb, resource):
    assert can(k, CONTROLLER_SA, verb, resource)


@pytest.mark.parametrize("verb, resource", [
    ("delete", "deployments.apps"), ("delete", "glmmodels.kubeglm.io"), ("update", "glmmodels.kubeglm.io"),
    ("get", "secrets"), ("create", "pods"), ("patch", "nodes"), ("escalate", "clusterroles"),
])
def test_the_controller_may_do_nothing_more(k, chart, verb, resource):
    assert not can(k, CONTROLLER_SA, verb, resource)


def test_the_lease_grant_is_narrowed_to_its_name(k, chart):
    assert can(k, CONTROLLER_SA, "update", "leases.coordination.k8s.io", SYSTEM_NS, "glm-operator-leader")
    assert not can(k, CONTROLLER_SA, "update", "leases.coordination.k8s.io", SYSTEM_NS, "kube-scheduler")
    assert not can(k, CONTROLLER_SA, "update", "leases.coordination.k8s.io", "default", "glm-operator-leader")


def test_the_autoscaler_lists_the_gateways_endpoint_slices_only_in_its_namespace(k, chart):
    assert can(k, CONTROLLER_SA, "list", "endpointslices.discovery.k8s.io", SYSTEM_NS)
    assert not can(k, CONTROLLER_SA, "list", "endpointslices.discovery.k8s.io", "default")
    assert not can(k, CONTROLLER_SA, "watch", "endpointslices.discovery.k8s.io", SYSTEM_NS)
    assert not can(k, CONTROLLER_SA, "update", "glmmodels.kubeglm.io/scale")


def test_the_gateway_reads_models_and_endpoints_and_may_only_scale(k, chart):
    for verb, resource in [("watch", "glmmodels.kubeglm.io"), ("watch", "endpointslices.discovery.k8s.io"),
                           ("get", "glmmodels.kubeglm.io/scale"), ("patch", "glmmodels.kubeglm.io/scale")]:
        assert can(k, GATEWAY_SA, verb, resource), (verb, resource)
    for verb, resource in [("patch", "glmmodels.kubeglm.io/status"), ("patch", "glmmodels.kubeglm.io"),
                           ("update", "glmmodels.kubeglm.io"), ("list", "pods"), ("get", "secrets"),
                           ("create", "leases.coordination.k8s.io"), ("patch", "endpointslices.discovery.k8s.io")]:
        assert not can(k, GATEWAY_SA, verb, resource), (verb, resource)


def test_optional_objects_are_accepted_by_the_api_server(k, chart, workdir):
    """NetworkPolicies and the namespaced-RBAC variant, rendered and sent as a server-side dry
    run: the API server validates them fully without keeping them."""
    from conftest import helm  # noqa: PLC0415

    from kube import ROOT
    rendered = helm(k, "template", RELEASE, str(ROOT / "charts" / "glm-operator"), "--namespace", SYSTEM_NS,
                    "--set", "networkPolicy.enabled=true", "--set", f"watchNamespace={SYSTEM_NS}",
                    "--set", "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ml").stdout
    path = workdir.file("optional.yaml")
    path.write_text(rendered)
    out = k.run("apply", "--dry-run=server", "-f", str(path))
    kinds = out.stdout
    assert "networkpolicy.networking.k8s.io/glm-operator-gateway created (server dry run)" in kinds
    assert "role.rbac.authorization.k8s.io/glm-operator created (server dry run)" in kinds
