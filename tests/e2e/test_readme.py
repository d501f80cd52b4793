"""The README's "Deploy on Kubernetes" block, run as written (its namespace made unique) against
the real API server, with the controller running. `helm install` is the session's `chart`
fixture, which runs that very line; the port-forward and curl lines need a kubelet that runs
containers, which kwok's fake nodes are not (test_gateway covers the gateway with real
glm-inference processes)."""

import os
import re
import shlex
import subprocess

from kube import HELM, KUBECTL, ROOT, condition_is, readme_commands, unique, wait_until

def test_the_readme_block_is_the_tests_install_command():
    from kube import CHART_VALUES, RELEASE, SYSTEM_NS  # noqa: PLC0415
    [install] = [c for c in readme_commands() if c.startswith("helm ")]
    assert shlex.split(install) == ["helm", "install", RELEASE, "charts/glm-operator", "--namespace", SYSTEM_NS,
                                    "--create-namespace", "--wait", *CHART_VALUES]


def test_the_readme_walkthrough_runs_as_written(k, api, chart, controller):
    ns = unique("e2e-readme")
    commands = [c for c in readme_commands()
                if not c.startswith("helm ") and "port-forward" not in c and not c.startswith("curl ")]
    assert len(commands) >= 7, commands
    env = {**os.environ, "KUBECONFIG": k.kubeconfig, "PATH": f"{KUBECTL.parent}:{HELM.parent}:{os.environ['PATH']}"}
    try:
        for command in commands:
            line = re.sub(r"\bai\b", ns, command)
            out = subprocess.run(shlex.split(line), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
            if line.startswith("kubectl get glm"):
                assert re.search(r"minilm\s+embedding\s+0\s+True", out.stdout), out.stdout
        wait_until("the model and its children gone", lambda: api.model(ns, "minilm") is None
                   and not k.items("deployments", ns))
    finally:
        k.run("delete", "namespace", ns, "--wait=false", check=False)
    assert not condition_is(api.model(ns, "minilm"), "Ready", "True")
