"""End-to-end helpers (the fixtures in conftest.py use them): a cluster (the test control plane + a
stand-in kubelet, or a real one), the operator as a subprocess, and helpers the tests share. See
e2e/README.md.

Default (CI): the session's control plane (tests/controlplane: etcd, kube-apiserver,
kube-controller-manager, the coscheduling scheduler, built from their Go modules); the chart is
installed with helm; `rlhf-operator operator` runs as a subprocess with the chart's arguments as the
chart's ServiceAccount; e2e/kubelet.py registers a GPU Node and runs the pods bound to it as local
processes. Real (E2E_REAL_CLUSTER=1): the current KUBECONFIG context is used as is (e.g. kind, see
README.md); the operator still runs as a local subprocess unless E2E_OPERATOR_IN_CLUSTER=1 says the
chart installed it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
REAL = os.environ.get("E2E_REAL_CLUSTER") == "1"
OPERATOR_IN_CLUSTER = os.environ.get("E2E_OPERATOR_IN_CLUSTER") == "1"
# The local control plane gets a namespace of its own (Pod Security restricted, pods pinned to the
# stand-in kubelet's node pool); a real cluster's default is `default`.
NAMESPACE = os.environ.get("E2E_NAMESPACE", "default" if REAL else "rlhf-e2e")
NODE_POOL = {"rlhf.dev/pool": "e2e"}  # labels of the stand-in kubelet's node = the namespace's node selector
FINISHED = ("Succeeded", "Failed")

# `tests.controlplane` is imported from the repository root, however pytest was started.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Nothing here uses the default kubeconfig: kubectl, the operator and the stand-in kubelet are all
# pointed at the control plane's files explicitly (a real cluster: the current context).
from tests.controlplane import kube  # noqa: E402 - after sys.path has the repository root
from tests.controlplane.cluster import ControlPlane  # noqa: E402

wait_for = kube.wait_for


@dataclass
class Cluster:
    """kubectl against the test control plane or the real cluster, plus what the stand-in kubelet exposes."""

    cp: ControlPlane | None  # None: a real cluster (the current kubeconfig context)
    kubelet: Any = None  # e2e.kubelet.StandInKubelet on the test control plane
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rlhf-e2e-")))
    kubeconfig: Path | None = None  # the admin's, with NAMESPACE as the context's namespace
    release: Any = None  # tests/controlplane/fixtures.Release: the chart installed watching NAMESPACE

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        if self.cp is not None:
            return kube.kubectl(self.cp, *args, input=input, check=check, kubeconfig=self.kubeconfig)
        result = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stdout}\n{result.stderr}")
        return result

    def env(self) -> dict[str, str]:
        return self.cp.env(self.kubeconfig) if self.cp is not None else dict(os.environ)

    def get_json(self, *args: str) -> Any:
        r = self.kubectl("get", *args, "-n", NAMESPACE, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(obj))

    def job(self, name: str) -> dict[str, Any] | None:
        return self.get_json("rlhfjob", name)

    def pods(self, job: str) -> list[dict[str, Any]]:
        got = self.get_json("pods", "-l", f"rlhf.dev/job={job}")
        return got["items"] if got else []

    def wait_phase(self, name: str, phases: tuple[str, ...] = FINISHED, timeout: float = 300) -> dict[str, Any]:
        return wait_for(
            lambda: (j := self.job(name)) and j.get("status", {}).get("phase") in phases and j,
            timeout=timeout, interval=0.25, what=f"job {name} in {phases}")

    def checkpoint_dir(self, job: str) -> Path:
        """The job's checkpoint volume as a local folder (the stand-in kubelet's: the bound volume's hostPath)."""
        if self.kubelet is not None:
            return self.kubelet.claim_dir(NAMESPACE, f"{job}-checkpoints")
        return copy_volume_out(self, job, self.workdir / job)

    def kill_random_pod(self, job: str, rng: random.Random) -> str | None:
        """Kill one running pod of the job: its process (stand-in kubelet) or the pod itself (real cluster)."""
        if self.kubelet is not None:
            names = [n for n in self.kubelet.running_pods() if n.startswith(f"{job}-")]
            if not names:
                return None
            victim = rng.choice(sorted(names))
            return victim if self.kubelet.kill_pod_process(victim) else None
        running = [p["metadata"]["name"] for p in self.pods(job) if p.get("status", {}).get("phase") == "Running"]
        if not running:
            return None
        victim = rng.choice(sorted(running))
        self.kubectl("delete", "pod", victim, "-n", NAMESPACE, "--grace-period=0", "--force", "--wait=false")
        return victim


def copy_volume_out(cluster: Cluster, job: str, dest: Path) -> Path:
    """Real cluster: copy the checkpoint claim out through a short-lived pod that mounts it."""
    pod = f"{job}-inspect"
    spec = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "c", "image": "busybox:1.36", "command": ["sleep", "600"],
                                     "volumeMounts": [{"name": "ck", "mountPath": "/checkpoints"}]}],
                     "volumes": [{"name": "ck", "persistentVolumeClaim": {"claimName": f"{job}-checkpoints"}}]}}
    cluster.apply(spec)
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{pod}", "-n", NAMESPACE, "--timeout=120s")
    dest.parent.mkdir(parents=True, exist_ok=True)
    cluster.kubectl("cp", f"{NAMESPACE}/{pod}:/checkpoints", str(dest))
    cluster.kubectl("delete", "pod", pod, "-n", NAMESPACE, "--wait=false")
    # kubectl cp nests the folder when dest already existed; accept both layouts
    return dest / "checkpoints" if (dest / "checkpoints").is_dir() else dest


class OperatorProcess:
    """`rlhf-operator operator` as a subprocess; kill() and start() again to test crash recovery.

    On the test control plane it runs with the chart's Deployment arguments as the chart's
    ServiceAccount (`release`: tests/controlplane/fixtures.Release, which watches NAMESPACE)."""

    def __init__(self, cluster: Cluster, log_path: Path, release: Any = None):
        self.cluster = cluster
        self.log_path = log_path
        self.release = release
        self.proc: subprocess.Popen | None = None
        self.metrics_url = ""  # the operator's /metrics (e2e/test_e2e_prometheus.py scrapes it)

    def start(self) -> None:
        if self.release is not None:
            op = self.release.operator(self.cluster.cp, self.log_path, wait=False)
            self.proc, self.metrics_url = op.process, op.metrics_url
            return
        port = kube.free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        cmd = [sys.executable, "-m", "rlhf_operator.cli", "operator", "--namespace", NAMESPACE,
               "--metrics-port", str(port), "--liveness", f"http://127.0.0.1:{kube.free_port()}/healthz"]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, env=self.cluster.env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizer work, exactly a crashed operator."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""


def example(name: str, job_name: str, **hyper: Any) -> dict[str, Any]:
    """An example manifest from crds/examples/, renamed, with hyperparameter / spec overrides."""
    obj = yaml.safe_load((REPO / "crds" / "examples" / name).read_text())
    obj["metadata"] = {"name": job_name, "namespace": NAMESPACE}
    spec = obj["spec"]
    for key in ("failurePolicy", "checkpoint", "suspend"):
        if key in hyper:
            value = hyper.pop(key)
            spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    spec.setdefault("hyperparameters", {}).update(hyper)
    return obj


def unique(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000) % 10**7}"
