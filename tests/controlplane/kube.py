"""Driving the test control plane: the real kubectl and helm, raw API requests, waits, namespaces
prepared like a tenant's, service-account kubeconfigs, and the operator as a subprocess.

    from tests.controlplane import cluster, kube
    cp = cluster.start(tmp)
    kube.create_namespace(cp, "team-a", service_accounts=["rlhf-trainer"])   # Pod Security restricted
    kube.kubectl(cp, "apply", "-n", "team-a", "-f", "crds/examples/ppo-tiny.yaml")
    op = kube.start_operator(cp, tmp / "operator.log", kubeconfig=sa_kubeconfig)
    pods = kube.wait_for(lambda: kube.get_json(cp, "pods", "-n", "team-a", "-l", "rlhf.dev/job=ppo-tiny"))

Nothing here reads the default kubeconfig: every call names the control plane it talks to.
"""

from __future__ import annotations

import functools
import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.controlplane.cluster import ControlPlane, free_port, kubeconfig_text

_BIN = Path(sys.executable).parent
T = TypeVar("T")
POD_SECURITY_LABEL = "pod-security.kubernetes.io/enforce"
NODE_SELECTOR_ANNOTATION = "scheduler.alpha.kubernetes.io/node-selector"  # the PodNodeSelector admission plugin


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(_BIN)) or shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in {_BIN} or on PATH (scripts/install.sh installs it)")
    return found


def kubectl(cp: ControlPlane, *args: str, input: str | None = None, check: bool = True,
            kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real kubectl against the control plane (as the admin unless `kubeconfig` says who);
    check=True raises AssertionError with its output on failure."""
    result = subprocess.run([_tool("kubectl"), "--cache-dir", str(cp.cache_dir), *args], input=input,
                            capture_output=True, text=True, env=cp.env(kubeconfig))
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def helm(cp: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real helm against the control plane as the admin (the API server's OpenAPI
    document is served, so helm validates manifests against it as on any cluster)."""
    result = subprocess.run([_tool("helm"), *args], capture_output=True, text=True, env=cp.env())
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def get_json(cp: ControlPlane, *args: str) -> Any:
    """`kubectl get ARGS -o json` parsed, or None when kubectl fails (e.g. NotFound)."""
    result = kubectl(cp, "get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


@functools.lru_cache(maxsize=8)
def _context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    return context


class ApiStatusError(AssertionError):
    """An API answer other than 2xx / 404: `status` is the HTTP code, `body` the Status object."""

    def __init__(self, message: str, status: int, body: dict[str, Any]):
        super().__init__(message)
        self.status, self.body = status, body


def api_request(cp: ControlPlane, method: str, path: str, body: Any = None,
                content_type: str = "application/json", token: str | None = None,
                warnings: list[str] | None = None) -> Any:
    """One raw API request as the admin (or as the holder of `token`); the JSON answer, None on 404.
    The answer's Warning headers are appended to `warnings` when given. Raises ApiStatusError for
    any other error status."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
        context = ssl.create_default_context(cafile=str(cp.pki.ca_cert))
    else:
        admin = cp.pki.clients["admin"]
        context = _context(cp.pki.ca_cert, admin.cert, admin.key)
    request = urllib.request.Request(cp.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            if warnings is not None:
                warnings += response.headers.get_all("Warning") or []
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        if warnings is not None:
            warnings += err.headers.get_all("Warning") or []
        if err.code == 404:
            return None
        text = err.read()
        try:
            status = json.loads(text)
        except ValueError:
            status = {"message": text[:500].decode(errors="replace")}
        raise ApiStatusError(f"{method} {path}: HTTP {err.code}: {status.get('message', status)}", err.code,
                             status) from err


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


def install_crds(cp: ControlPlane, paths: Iterable[str | Path], timeout: str = "60s") -> None:
    """kubectl apply each CRD file (validated against the server's OpenAPI) and wait until Established."""
    paths = list(paths)
    kubectl(cp, "apply", *[a for p in paths for a in ("-f", str(p))])
    names = []
    for path in paths:
        names += [f"crd/{n}" for n in kubectl(cp, "get", "-f", str(path), "-o", "jsonpath={.metadata.name}").stdout.split()]
    kubectl(cp, "wait", "--for=condition=Established", *names, f"--timeout={timeout}")


# --- tenants -------------------------------------------------------------------------------------

def create_namespace(cp: ControlPlane, name: str, *, pod_security: str = "restricted",
                     node_selector: dict[str, str] | None = None, service_accounts: Iterable[str] = ()) -> None:
    """A job namespace as a cluster admin prepares one: Pod Security `pod_security` enforced, pods
    pinned to nodes with `node_selector` labels (PodNodeSelector; tiers sharing a cluster keep their
    pods apart this way), and service accounts without any role (the trainer's)."""
    annotations = {}
    if node_selector:
        annotations[NODE_SELECTOR_ANNOTATION] = ",".join(f"{k}={v}" for k, v in sorted(node_selector.items()))
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": name, "labels": {POD_SECURITY_LABEL: pod_security},
                                                   "annotations": annotations}}]
    objects += [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": name},
                 "automountServiceAccountToken": False} for sa in service_accounts]
    kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump_all(objects))


def delete_namespace(cp: ControlPlane, name: str, timeout: float = 120) -> None:
    """Delete a namespace and wait until the namespace controller has removed it and its content."""
    kubectl(cp, "delete", "namespace", name, "--wait=false", "--ignore-not-found")
    wait_for(lambda: get_json(cp, "namespace", name) is None, timeout=timeout, interval=0.25,
             what=f"namespace {name} deleted")


def service_account_token(cp: ControlPlane, namespace: str, name: str, seconds: int = 24 * 3600) -> str:
    """A bound token for a ServiceAccount from the TokenRequest API (what `kubectl create token` asks)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": seconds}}
    answer = api_request(cp, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", request)
    if answer is None:
        raise AssertionError(f"service account {namespace}/{name} not found")
    return answer["status"]["token"]


def service_account_kubeconfig(cp: ControlPlane, namespace: str, name: str, path: Path) -> Path:
    """Write a kubeconfig that authenticates as the ServiceAccount with a bound token, so everything
    run with it (an operator, kubectl) gets exactly that account's RBAC rights: a missing verb is a 403."""
    token = service_account_token(cp, namespace, name)
    path.write_text(kubeconfig_text(cp.url, cp.pki.ca_cert, f"system:serviceaccount:{namespace}:{name}",
                                    token=token, namespace=namespace))
    return path


# --- playing a kubelet: tests that drive pod phases themselves ---------------------------------------

def pod_status_patch(phase: str, pod_ip: str = "", exit_code: int | None = None,
                     container: str = "trainer") -> dict[str, Any]:
    """The status a kubelet would write: phase, podIP, and a terminated container when exit_code is given."""
    status: dict[str, Any] = {"phase": phase}
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    if exit_code is not None:
        reason = "Completed" if exit_code == 0 else "Error"
        status["containerStatuses"] = [{"name": container, "ready": False, "restartCount": 0, "image": "local",
                                        "imageID": "", "state": {"terminated": {"exitCode": exit_code,
                                                                                "reason": reason}}}]
    elif phase == "Running":
        status["containerStatuses"] = [{"name": container, "ready": True, "restartCount": 0, "image": "local",
                                        "imageID": "", "state": {"running": {}}}]
    return status


def set_pod_status(cp: ControlPlane, pod: str, phase: str, pod_ip: str = "", exit_code: int | None = None,
                   namespace: str = "default") -> None:
    """Patch one pod's status subresource like a kubelet (phase Running, or Succeeded/Failed + exit code)."""
    api_request(cp, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}/status",
                {"status": pod_status_patch(phase, pod_ip, exit_code)}, "application/merge-patch+json")


# --- the operator as a subprocess ----------------------------------------------------------------

@dataclass
class Operator:
    """`rlhf-operator operator` running as a subprocess."""

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

    def kill(self) -> None:
        """SIGKILL: no cleanup, exactly a crashed operator."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_operator(cp: ControlPlane, log_path: Path, *args: str, kubeconfig: Path | None = None,
                   timeout: float = 60.0, wait: bool = True) -> Operator:
    """Start `rlhf-operator operator ARGS` (all namespaces unless ARGS say otherwise) as the user of
    `kubeconfig` (the admin when None) and, with wait=True, wait until /metrics answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "rlhf_operator.cli", "operator", "--metrics-port", str(port),
           "--liveness", f"http://127.0.0.1:{free_port()}/healthz", *args]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=cp.env(kubeconfig), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    op = Operator(process=proc, metrics_url=f"http://127.0.0.1:{port}/metrics", log_path=Path(log_path))

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"operator exited with {proc.returncode}:\n{op.log_tail()}")
        try:
            return bool(op.scrape())
        except OSError:
            return False

    if wait:
        wait_for(answers, timeout=timeout, interval=0.1, what="the operator's /metrics")
    return op
