"""Helpers of the end-to-end tests: the cluster from scripts/cluster.sh, kubectl, processes on the
host (glm-operator controller and gateway, glm-inference), and polling with deadlines.

Nothing here sleeps to make an assertion true: every wait polls a condition until a deadline and
fails with what it last saw.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"
KUBECTL = Path(os.environ.get("KUBECTL", TOOLS / "kubectl"))
HELM = Path(os.environ.get("HELM", TOOLS / "helm"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
OPERATOR_BIN = Path(os.environ.get("GLM_OPERATOR_BIN", TARGET / "debug" / "glm-operator"))
INFERENCE_BIN = Path(os.environ.get("GLM_INFERENCE_BIN", TARGET / "debug" / "glm-inference"))
MODELS = Path(os.environ.get("GLM_MODELS_DIR", ROOT / ".models"))
MINILM = MODELS / "all-MiniLM-L6-v2"
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"

RELEASE = "glm-operator"
# `helm install` values of the README's "Deploy on Kubernetes" (none: the defaults).
CHART_VALUES: list[str] = []
SYSTEM_NS = "glm-system"
LEASE = "glm-operator-leader"
GROUP, VERSION, PLURAL = "kubeglm.io", "v1alpha1", "glmmodels"

# Generous: the machine running CI is shared and busy; a deadline only bounds a failure.
DEADLINE = float(os.environ.get("GLM_E2E_DEADLINE", "120"))


README_MARKER = "<!-- e2e: deploy -->"


def readme_commands() -> list[str]:
    """The commands of the README's "Deploy on Kubernetes" block, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_MARKER in text, f"README.md lost its {README_MARKER} block"
    block = re.search(r"```sh\n(.*?)```", text[text.index(README_MARKER):], re.S)
    assert block, "no ```sh block after the marker"
    joined = block.group(1).replace("\\\n", " ")  # shell line continuations
    return [line for line in joined.splitlines() if line and not line.startswith("#")]


class Timeout(AssertionError):
    pass


def wait_until(what: str, probe: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.25):
    """Calls `probe` until it returns a truthy value (returned) or `timeout` passes (fails with
    the last value or exception)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - kept as the failure's explanation
            last = err
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_kubeconfig() -> str:
    """The admin kubeconfig of the running scripts/cluster.sh cluster."""
    out = subprocess.run([str(ROOT / "scripts" / "cluster.sh"), "env"], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"no cluster: run scripts/cluster.sh up first ({out.stderr.strip()})")
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("KUBECONFIG="), line
    return line.split("=", 1)[1]


@dataclass
class Kubectl:
    kubeconfig: str

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(KUBECTL), "--kubeconfig", self.kubeconfig, *args],
            input=input, capture_output=True, text=True, timeout=120,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def apply(self, doc: dict | str, namespace: str | None = None, *extra: str) -> subprocess.CompletedProcess:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
        ns = ["-n", namespace] if namespace else []
        return self.run("apply", *ns, *extra, "-f", "-", input=text)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        ns = ["-n", namespace] if namespace else []
        out = self.run("get", kind, name, *ns, "-o", "json", "--ignore-not-found", check=False)
        if out.returncode != 0:
            raise AssertionError(out.stderr)
        return json.loads(out.stdout) if out.stdout.strip() else None

    def items(self, kind: str, namespace: str, selector: str | None = None) -> list[dict]:
        sel = ["-l", selector] if selector else []
        return self.json("get", kind, "-n", namespace, *sel)["items"]


class Api:
    """A small REST client for polling (kubectl costs a process per call): bearer token and CA
    from a kubeconfig as scripts/cluster.sh and the tests write them."""

    def __init__(self, kubeconfig: str):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        cluster = cfg["clusters"][0]["cluster"]
        self.server = cluster["server"].rstrip("/")
        self.token = cfg["users"][0]["user"]["token"]
        self.ssl = ssl.create_default_context(cafile=cluster["certificate-authority"])

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type,
            "Accept": "application/json"})
        return send(req, 30, self.ssl)

    def get(self, path: str) -> dict | None:
        code, body = self.request("GET", path)
        if code == 404:
            return None
        assert code == 200, f"GET {path}: {code} {body}"
        return body

    def items(self, path: str, selector: str | None = None) -> list[dict]:
        query = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        return (self.get(path + query) or {}).get("items", [])

    def model(self, namespace: str, name: str) -> dict | None:
        return self.get(model_path(namespace, name))


def model_path(namespace: str, name: str = "") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}" + (f"/{name}" if name else "")


# ---- GLMModel status ---------------------------------------------------------------------------


def condition(obj: dict | None, type_: str) -> dict | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def condition_is(obj: dict | None, type_: str, status: str, reason: str | None = None) -> bool:
    c = condition(obj, type_)
    return bool(c and c["status"] == status and (reason is None or c["reason"] == reason))


def events_of(k: Kubectl, namespace: str, name: str) -> list[dict]:
    """Events about the GLMModel `name`, as `kubectl get events` lists them."""
    return [
        e for e in k.items("events", namespace)
        if e.get("involvedObject", {}).get("kind") == "GLMModel" and e["involvedObject"].get("name") == name
    ]


def has_event(k: Kubectl, namespace: str, name: str, reason: str, type_: str | None = None) -> dict | None:
    for e in events_of(k, namespace, name):
        if e.get("reason") == reason and (type_ is None or e.get("type") == type_):
            return e
    return None


def is_subset(expected: Any, actual: Any, path: str = "") -> str | None:
    """None when every field of `expected` has the same value in `actual` (which may hold more,
    e.g. server defaults); else the path of the first difference."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            diff = is_subset(value, actual.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{path}: expected {expected!r}, got {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            diff = is_subset(e, a, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if expected == actual else f"{path}: expected {expected!r}, got {actual!r}"


# ---- processes on the host ---------------------------------------------------------------------


@dataclass
class Proc:
    """A process the tests started, with its output in a log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        handle = open(self.log, "ab")
        self.popen = subprocess.Popen(
            self.args, env=self.env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        assert self.popen
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.wait(30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.wait(30)


def send(req: urllib.request.Request, timeout: float, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """Status and JSON body (text when not JSON) of a request, error statuses included."""
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


def http_json(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    return send(urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}), timeout)


def respond(handler, code: int, body: bytes, content_type: str) -> None:
    """Write one complete response from an http.server handler (the tests' stand-in servers)."""
    handler.send_response(code)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def http_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    pattern = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@dataclass
class Workdir:
    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="glm-e2e-")))

    def file(self, name: str) -> Path:
        return self.path / name
