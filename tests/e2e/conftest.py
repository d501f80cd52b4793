"""Fixtures of the end-to-end tests against the real control plane of scripts/cluster.sh.

The chart is installed with helm as the README says; the controller and the gateway then run on
the host (kwok pods run no containers) as the chart configures them: the environment of the
installed Deployments, and the tokens of the chart's ServiceAccounts (TokenRequest), so the
API server's RBAC authorizer checks exactly the chart's grants.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kube import (
    DEADLINE,
    HELM,
    INFERENCE_BIN,
    KUBECTL,
    LEASE,
    OPERATOR_BIN,
    RELEASE,
    ROOT,
    SYSTEM_NS,
    Api,
    Kubectl,
    Proc,
    Workdir,
    cluster_kubeconfig,
    free_port,
    readme_commands,
    http_json,
    http_text,
    unique,
    wait_until,
)


def pytest_configure(config):
    for path, how in [(KUBECTL, "scripts/install-tools.sh"), (HELM, "scripts/install-tools.sh"),
                      (OPERATOR_BIN, "cargo build (or set GLM_OPERATOR_BIN)"),
                      (INFERENCE_BIN, "cargo build (or set GLM_INFERENCE_BIN)")]:
        if not Path(path).exists():
            raise pytest.UsageError(f"{path} missing: {how}")


@pytest.fixture(scope="session")
def workdir() -> Workdir:
    return Workdir()


@pytest.fixture(scope="session")
def k() -> Kubectl:
    return Kubectl(cluster_kubeconfig())


@pytest.fixture(scope="session")
def api(k: Kubectl) -> Api:
    return Api(k.kubeconfig)


def helm(k: Kubectl, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([str(HELM), "--kubeconfig", k.kubeconfig, *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, f"helm {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="session")
def chart(k: Kubectl) -> dict:
    """The README's `helm install` line, run as written (unless a previous run on this cluster
    installed the release already). Its --wait: the Deployments roll out on the fake nodes."""
    installed = subprocess.run([str(HELM), "--kubeconfig", k.kubeconfig, "status", RELEASE, "-n", SYSTEM_NS],
                               capture_output=True, text=True)
    if installed.returncode != 0:
        [line] = [c for c in readme_commands() if c.startswith("helm install ")]
        helm(k, *shlex.split(line)[1:], "--timeout", "5m")
    else:
        # Installed by an earlier run: upgrade as the README says (helm never upgrades CRDs).
        k.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / "glmmodel.yaml"))
        helm(k, "upgrade", RELEASE, str(ROOT / "charts" / "glm-operator"), "-n", SYSTEM_NS, "--wait")
    return {d["metadata"]["name"]: d for d in k.items("deployments", SYSTEM_NS)}


def service_account_kubeconfig(k: Kubectl, workdir: Workdir, account: str) -> str:
    """A kubeconfig carrying a TokenRequest token of the ServiceAccount `account`."""
    token = k.run("create", "token", account, "-n", SYSTEM_NS, "--duration", "4h").stdout.strip()
    admin = yaml.safe_load(Path(k.kubeconfig).read_text())
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {
            "cluster": admin["clusters"][0]["name"], "user": account, "namespace": SYSTEM_NS}}],
        "current-context": account,
    }
    path = workdir.file(f"{account}.kubeconfig")
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return str(path)


def container_of(deployment: dict) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def chart_env(deployment: dict) -> dict[str, str]:
    """The plain env values the chart gives the container (fieldRefs are filled by the caller)."""
    return {e["name"]: e["value"] for e in container_of(deployment).get("env", []) if "value" in e}


@dataclass
class Controller:
    proc: Proc
    identity: str
    metrics_url: str

    def metrics(self) -> str:
        return http_text(self.metrics_url)


@dataclass
class Gateway:
    proc: Proc
    base: str

    def ready(self) -> bool:
        code, _ = http_json(f"{self.base}/ready", timeout=5)
        return code == 200


class Host:
    """Starts the controller, gateway and glm-inference processes of one test module and stops
    them at its end."""

    def __init__(self, k: Kubectl, chart: dict, workdir: Workdir):
        self.k = k
        self.chart = chart
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.operator_kubeconfig = service_account_kubeconfig(k, workdir, "glm-operator")
        self.gateway_kubeconfig = service_account_kubeconfig(k, workdir, "glm-operator-gateway")

    def _proc(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, args, env, self.workdir.file(f"{name}.log")).start()
        self.procs.append(proc)
        return proc

    def controller(self, identity: str | None = None, *flags: str) -> Controller:
        """`glm-operator controller` as the chart's Deployment runs it, on the host."""
        deployment = self.chart[RELEASE]
        identity = identity or unique("e2e-controller")
        port = free_port()
        env = {"PATH": os.environ.get("PATH", ""), **chart_env(deployment),
               "KUBECONFIG": self.operator_kubeconfig,
               "POD_NAME": identity, "POD_NAMESPACE": SYSTEM_NS,
               "GLM_METRICS_PORT": str(port), "GLM_METRICS_BIND_ADDRESS": "127.0.0.1",
               "RUST_LOG": "info,glm_operator=debug,kube=warn", "NO_COLOR": "1"}
        args = [str(OPERATOR_BIN), *container_of(deployment)["args"], *flags]
        proc = self._proc(identity, args, env)
        controller = Controller(proc, identity, f"http://127.0.0.1:{port}/metrics")
        wait_until(f"{identity} serving /metrics",
                   lambda: self._alive(proc) and controller.metrics())
        return controller

    def gateway(self, connect_to: dict[str, str] | None = None, name: str | None = None) -> Gateway:
        """`glm-operator gateway` as the chart's gateway Deployment runs it, on the host; model
        endpoints (in-cluster Service names) are reached at `connect_to`'s loopback addresses."""
        deployment = self.chart[f"{RELEASE}-gateway"]
        port = free_port()
        env = {"PATH": os.environ.get("PATH", ""), **chart_env(deployment),
               "KUBECONFIG": self.gateway_kubeconfig,
               "GLM_GATEWAY_PORT": str(port), "GLM_GATEWAY_BIND_ADDRESS": "127.0.0.1",
               "GLM_GATEWAY_SHUTDOWN_DELAY": "1", "NO_COLOR": "1",
               "GLM_GATEWAY_CONNECT_TO": ",".join(f"{a}={b}" for a, b in (connect_to or {}).items())}
        args = [str(OPERATOR_BIN), *container_of(deployment)["args"]]
        proc = self._proc(name or unique("e2e-gateway"), args, env)
        gateway = Gateway(proc, f"http://127.0.0.1:{port}")
        wait_until("the gateway ready (first GLMModel list routed)",
                   lambda: self._alive(proc) and gateway.ready())
        return gateway

    def inference(self, *models: tuple[str, Path]) -> str:
        """A real glm-inference serving `models` on a free loopback port: its host:port."""
        port = free_port()
        args = [str(INFERENCE_BIN), "--host", "127.0.0.1", "--port", str(port)]
        for name, path in models:
            assert path.exists(), f"{path} missing: run scripts/fetch-models.sh"
            args += ["--model", f"{name}={path}"]
        proc = self._proc(unique("e2e-inference"), args, {"PATH": os.environ.get("PATH", "")})
        wait_until("glm-inference ready", lambda: self._alive(proc)
                   and http_json(f"http://127.0.0.1:{port}/ready", timeout=5)[0] == 200, timeout=300)
        return f"127.0.0.1:{port}"

    @staticmethod
    def _alive(proc: Proc) -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        return True

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def host(k, chart, workdir, request):
    h = Host(k, chart, workdir)
    yield h
    failed = request.session.testsfailed
    h.stop_all()
    if failed:
        for proc in h.procs:
            print(f"\n---- {proc.name} (last lines) ----\n{proc.tail(60)}")


def lease_holder(api: Api) -> str | None:
    lease = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{LEASE}")
    return ((lease or {}).get("spec") or {}).get("holderIdentity") or None


@pytest.fixture(scope="module")
def controller(host, api) -> Controller:
    """One leading controller for the module."""
    c = host.controller()
    wait_until(f"{c.identity} to lead", lambda: lease_holder(api) == c.identity)
    return c


@pytest.fixture
def namespace(k, api):
    """A fresh namespace per test (deleted afterwards), with its default ServiceAccount, which
    pods need before the ReplicaSet controller can create them."""
    created: list[str] = []

    def make(prefix: str = "e2e") -> str:
        name = unique(prefix)
        k.run("create", "namespace", name)
        wait_until(f"ServiceAccount {name}/default",
                   lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"))
        created.append(name)
        return name

    yield make
    for name in created:
        k.run("delete", "namespace", name, "--wait=false", check=False)


def recycle_volumes(api: Api, needed: int) -> None:
    """The cluster's test PersistentVolumes are Retain: a claim deleted with its namespace leaves
    its volume Released. Make those Available again (as an admin would) and wait for `needed`."""
    def available() -> int:
        count = 0
        for pv in api.items("/api/v1/persistentvolumes", "kubeglm.io/test-volume=true"):
            phase = (pv.get("status") or {}).get("phase")
            if phase == "Released":
                api.request("PATCH", f"/api/v1/persistentvolumes/{pv['metadata']['name']}",
                            [{"op": "remove", "path": "/spec/claimRef"}],
                            "application/json-patch+json")
            count += phase == "Available"
        return count >= needed

    wait_until(f"{needed} Available test volumes", available)


__all__ = ["Controller", "Gateway", "Host", "lease_holder", "recycle_volumes", "DEADLINE", "json",
           "signal", "time"]
