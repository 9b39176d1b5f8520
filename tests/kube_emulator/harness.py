"""Start/stop the API emulator and drive it with the real kubectl and helm.

Typical use (tests/integration/conftest.py does this once per session):

    from tests.kube_emulator import harness
    emu = harness.start_emulator(tmp_dir)        # subprocess; writes tmp_dir/kubeconfig
    os.environ["KUBECONFIG"] = str(emu.kubeconfig)  # before anything imports `kubernetes`
    harness.install_crds(emu, [harness.VOLCANO_CRD, harness.COSCHEDULING_CRD, "crds/rlhfjobs.yaml"])
    harness.kubectl(emu, "apply", "--validate=false", "-f", "crds/examples/ppo-tiny.yaml")  # no OpenAPI served
    pods = harness.wait_for(lambda: harness.get_json(emu, "pods", "-l", "rlhf.dev/job=ppo-tiny"))
    op = harness.start_operator(emu, tmp_dir / "operator.log")   # `rlhf-operator operator` subprocess
    harness.helm(emu, "install", "demo", "charts/rlhf-operator", "--disable-openapi-validation")
    op.stop(); harness.stop_emulator(emu)

The emulator schedules nothing and runs no kubelet: tests play the kubelet with set_pod_phase /
set_pod_exit. Its garbage collector cascades a DELETE to dependents by ownerReferences uid.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
EMULATOR_SCRIPT = HERE / "k8semu.py"
VOLCANO_CRD = HERE / "crds" / "podgroups-volcano.yaml"
COSCHEDULING_CRD = HERE / "crds" / "podgroups-coscheduling.yaml"
_BIN = Path(sys.executable).parent

T = TypeVar("T")


@dataclass
class Emulator:
    """A running emulator subprocess and the files that point clients at it."""

    url: str
    kubeconfig: Path
    cache_dir: Path
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        """Environment for a child process (kubectl, helm, an operator) that talks to this emulator."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": str(self.cache_dir),
                "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def kubeconfig_text(url: str, namespace: str = "default") -> str:
    return (
        "apiVersion: v1\nkind: Config\n"
        f'clusters: [{{name: emu, cluster: {{server: "{url}"}}}}]\n'
        "users: [{name: emu, user: {token: emulator}}]\n"
        f"contexts: [{{name: emu, context: {{cluster: emu, user: emu, namespace: {namespace}}}}}]\n"
        "current-context: emu\n"
    )


def start_emulator(workdir: Path, port: int = 0, startup_timeout: float = 30.0) -> Emulator:
    """Start k8semu.py as a subprocess on a free loopback port; write workdir/kubeconfig for it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-W", "ignore", str(EMULATOR_SCRIPT), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + startup_timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if line.startswith("KMOCK_URL=") or proc.poll() is not None:
            break
    if not line.startswith("KMOCK_URL="):
        proc.kill()
        raise RuntimeError(f"emulator did not start: {line!r} (exit {proc.poll()})")
    url = line.split("=", 1)[1]
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text(url))
    return Emulator(url=url, kubeconfig=kubeconfig, cache_dir=workdir / "kube-cache", process=proc)


def stop_emulator(emu: Emulator) -> None:
    emu.process.terminate()
    try:
        emu.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        emu.process.kill()
        emu.process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Operator:
    """`rlhf-operator operator` running as a subprocess against an emulator."""

    process: subprocess.Popen
    metrics_url: str
    log_path: Path

    def scrape(self) -> str:
        """The operator's /metrics text."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_operator(emu: Emulator, log_path: Path, *args: str, timeout: float = 30.0) -> Operator:
    """Start the operator (all namespaces unless args say otherwise) and wait until /metrics answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "rlhf_operator.cli", "operator", "--metrics-port", str(port),
           "--liveness", f"http://127.0.0.1:{free_port()}/healthz", *args]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=emu.env(), stdout=log, stderr=subprocess.STDOUT)
    op = Operator(process=proc, metrics_url=f"http://127.0.0.1:{port}/metrics", log_path=Path(log_path))

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"operator exited with {proc.returncode}:\n{op.log_tail()}")
        try:
            return bool(op.scrape())
        except OSError:
            return False

    wait_for(answers, timeout=timeout, interval=0.1, what="the operator's /metrics")
    return op


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(_BIN)) or shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in {_BIN} or on PATH (scripts/install.sh installs it)")
    return found


def kubectl(emu: Emulator, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real kubectl against the emulator; check=True raises with its output on failure."""
    result = subprocess.run([_tool("kubectl"), "--cache-dir", str(emu.cache_dir), *args], input=input,
                            capture_output=True, text=True, env=emu.env())
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def helm(emu: Emulator, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real helm against the emulator (pass --disable-openapi-validation to install/upgrade)."""
    result = subprocess.run([_tool("helm"), *args], capture_output=True, text=True, env=emu.env())
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def get_json(emu: Emulator, *args: str) -> Any:
    """`kubectl get ARGS -o json` parsed, or None when kubectl fails (e.g. NotFound)."""
    result = kubectl(emu, "get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def api_request(emu: Emulator, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
    """One raw API request (much faster than a kubectl process); the JSON answer, None on 404."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(emu.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Authorization": "Bearer emulator"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise AssertionError(f"{method} {path}: HTTP {err.code}: {err.read()[:500]!r}") from err


def install_crds(emu: Emulator, paths: list[str | Path], timeout: str = "20s") -> None:
    """kubectl apply each CRD file and wait until every one is Established."""
    for path in paths:
        kubectl(emu, "apply", "--validate=false", "-f", str(path))
    names = []
    for path in paths:
        out = kubectl(emu, "get", "-f", str(path), "-o", "jsonpath={.metadata.name}").stdout.split()
        names += [f"crd/{n}" for n in out]
    kubectl(emu, "wait", "--for=condition=Established", *names, f"--timeout={timeout}")


def wait_for(probe: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = "") -> T:
    """Poll probe() until it returns something truthy; raise AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}; last value {value!r}")
        time.sleep(interval)


# --- playing the kubelet: the emulator runs no pods, so tests write pod status themselves ---

def pod_status_patch(phase: str, pod_ip: str = "", exit_code: int | None = None,
                     container: str = "trainer") -> dict[str, Any]:
    """The status a kubelet would write: phase, podIP, and a terminated container when exit_code is given."""
    status: dict[str, Any] = {"phase": phase}
    if pod_ip:
        status["podIP"] = pod_ip
    if exit_code is not None:
        reason = "Completed" if exit_code == 0 else "Error"
        status["containerStatuses"] = [{"name": container, "ready": False, "restartCount": 0, "image": "",
                                        "imageID": "", "state": {"terminated": {"exitCode": exit_code,
                                                                                "reason": reason}}}]
    elif phase == "Running":
        status["containerStatuses"] = [{"name": container, "ready": True, "restartCount": 0, "image": "",
                                        "imageID": "", "state": {"running": {}}}]
    return status


def set_pod_status(emu: Emulator, pod: str, phase: str, pod_ip: str = "", exit_code: int | None = None,
                   namespace: str = "default") -> None:
    """Patch one pod's status subresource like a kubelet (phase Running, or Succeeded/Failed + exit code)."""
    api_request(emu, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}/status",
                {"status": pod_status_patch(phase, pod_ip, exit_code)}, "application/merge-patch+json")
