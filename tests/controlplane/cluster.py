"""A Kubernetes control plane on loopback, started and stopped like controller-runtime's envtest.

    from tests.controlplane import cluster
    cp = cluster.start(workdir)          # etcd, kube-apiserver, kube-controller-manager, scheduler
    subprocess.run(["kubectl", "get", "nodes"], env=cp.env())   # admin kubeconfig, system:masters
    cluster.stop(cp)                     # every process group, SIGTERM then SIGKILL

The binaries come from e2e/controlplane/build.sh (built from the Go modules pinned there on first use,
then reused from a cache folder). What runs, all on 127.0.0.1 with free ports:

- etcd (one member, `--unsafe-no-fsync` as envtest starts it: a test cluster needs no durability);
- kube-apiserver with RBAC authorization, the PodSecurity and PodNodeSelector admission plugins (plus
  the default set: ServiceAccount, NamespaceLifecycle, DefaultStorageClass, ...), service-account
  tokens signed with our own key, client certificates from our own CA (pki.py);
- kube-controller-manager running the controllers the tests lean on (CONTROLLERS: garbage collector,
  namespace, service accounts and their tokens, root CA publisher, node lifecycle, PV binder, PVC/PV
  protection, pod GC), each under its own service account as kubeadm runs it;
- the scheduler-plugins kube-scheduler (kube-scheduler + coscheduling) with SCHEDULER_NAME profile
  using the Coscheduling plugin, and the PodGroup CRD from scheduler-plugins' own manifests;
- the stand-in volume provisioner (provisioner.py) behind a default StorageClass `standard`.

No kubelet: tests/controlplane/nodes.py registers Nodes and plays their kubelets. Every process runs
in its own process group with PR_SET_PDEATHSIG (when started for a test session), so a killed test
run leaves nothing behind; stop() and an atexit hook end them in order.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rlhf_operator.localexec import free_port

from tests.controlplane import pki as pki_mod

REPO = Path(__file__).resolve().parents[2]
GO_MODULE = REPO / "e2e" / "controlplane"
BUILD_SCRIPT = GO_MODULE / "build.sh"
HERE = Path(__file__).resolve().parent


def _pinned_version() -> str:
    """The Kubernetes release build.sh builds (its K8S_VERSION line: the one place it is written)."""
    for line in BUILD_SCRIPT.read_text().splitlines():
        if line.startswith("K8S_VERSION="):
            return line.split("=", 1)[1].split()[0]
    raise RuntimeError(f"{BUILD_SCRIPT}: no K8S_VERSION= line")


K8S_VERSION = _pinned_version()
VOLCANO_CRD = HERE / "crds" / "podgroups-volcano.yaml"  # Volcano's PodGroup (schema trimmed), no Volcano scheduler
SCHEDULER_NAME = "scheduler-plugins-scheduler"  # the coscheduling profile; = builders.BuildSettings' default
STORAGE_CLASS = "standard"  # default StorageClass (as kind ships), served by provisioner.py
PROVISIONER = "rlhf.dev/stand-in-local-path"
SERVICE_CIDR = "10.0.0.0/24"
UNSCHEDULABLE_RETRY = "10s"  # kube-scheduler --pod-max-in-unschedulable-pods-duration, see _start_all
ISSUER = "https://kubernetes.default.svc.cluster.local"
STOP_ORDER = ("provisioner", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
CONTROLLERS = (
    "garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
    "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
    "node-lifecycle-controller", "persistentvolume-binder-controller",
    "persistentvolumeclaim-protection-controller", "persistentvolume-protection-controller",
    "pod-garbage-collector-controller", "clusterrole-aggregation-controller",
)


class ControlPlaneError(RuntimeError):
    """A component did not build, start or become ready; the message names it and its log."""


@dataclass
class ControlPlane:
    """A running control plane: where it listens, its files, its processes."""

    workdir: Path
    url: str  # https://127.0.0.1:<port> of kube-apiserver
    pki: pki_mod.Pki
    kubeconfig: Path  # admin (system:masters)
    bin_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "kube-cache"

    @property
    def volumes_dir(self) -> Path:
        """Where provisioner.py makes each claim's folder (the PVs' hostPath)."""
        return self.workdir / "volumes"

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """Environment for a child process (kubectl, helm, an operator) that talks to this cluster."""
        return {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig), "KUBECACHEDIR": str(self.cache_dir),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def ssl_context(self) -> ssl.SSLContext:
        """TLS to the API server as the admin: our CA, the admin's client certificate."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        admin = self.pki.clients["admin"]
        context.load_cert_chain(admin.cert, admin.key)
        return context


# --- binaries ------------------------------------------------------------------------------------

def binaries(log: Path | None = None) -> Path:
    """The folder holding kube-apiserver, kube-controller-manager, kube-scheduler and etcd, built by
    e2e/controlplane/build.sh when its cache misses (tens of minutes cold on 2 cores, see
    e2e/README.md) and reused after. Raises ControlPlaneError when the build fails."""
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=out, text=True)
    finally:
        if log:
            out.close()
    if result.returncode != 0:
        where = f"; its output is in {log}" if log else ""
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}{where} "
                                "(it needs Go and the Go module proxy on a cold cache)")
    return Path(result.stdout.strip().splitlines()[-1])


def module_dir(module: str) -> Path:
    """A dependency's folder in the Go module cache, at the version e2e/controlplane/go.mod pins."""
    result = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", module], cwd=GO_MODULE, capture_output=True,
                            text=True, env={**os.environ, "GOFLAGS": "-mod=mod"})
    if result.returncode != 0 or not result.stdout.strip():
        raise ControlPlaneError(f"go list -m {module} in {GO_MODULE}: {result.stderr.strip()}")
    return Path(result.stdout.strip())


def coscheduling_manifests() -> tuple[Path, list[dict[str, Any]]]:
    """scheduler-plugins' PodGroup CRD file, and the ClusterRole + binding its all-in-one install
    gives the scheduler's user on PodGroups (the bootstrap system:kube-scheduler role lacks them)."""
    root = module_dir("sigs.k8s.io/scheduler-plugins") / "manifests"
    docs = [d for d in yaml.safe_load_all((root / "install" / "all-in-one.yaml").read_text()) if d]
    rbac = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
            and d["metadata"]["name"] == "system:kube-scheduler:plugins"]
    if len(rbac) != 2:
        raise ControlPlaneError(f"{root}/install/all-in-one.yaml: no system:kube-scheduler:plugins role and binding")
    return root / "coscheduling" / "crd.yaml", rbac


# --- processes -----------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies (Linux prctl)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def spawn(cp: ControlPlane, name: str, argv: list[str], tied: bool, env: dict[str, str] | None = None) -> None:
    """Start one component in its own process group, output to logs/<name>.log; `tied`: it dies with us."""
    cp.log(name).parent.mkdir(parents=True, exist_ok=True)
    with open(cp.log(name), "ab") as out:
        cp.processes[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True, env=env,
                                              preexec_fn=_die_with_parent if tied else None)
    _write_state(cp)


def _write_state(cp: ControlPlane) -> None:
    state = {"url": cp.url, "kubeconfig": str(cp.kubeconfig), "ports": cp.ports,
             "pids": {n: p.pid for n, p in cp.processes.items()}}
    (cp.workdir / "state.json").write_text(json.dumps(state, indent=1))


def stop_group(pid: int, grace: float = 10.0, child: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group `pid` leads, wait up to `grace` s for it to end, then SIGKILL
    whatever is left in the group. `child`: the leader is our child (it is reaped here; a zombie
    leader would keep its group alive to a signal-0 probe)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if child is not None:
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    else:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(cp: ControlPlane) -> None:
    """Stop every component, newest layer first; safe to call twice."""
    atexit.unregister(stop)
    for name in STOP_ORDER:
        proc = cp.processes.pop(name, None)
        if proc is not None:
            stop_group(proc.pid, child=proc)
            proc.wait()
    _write_state(cp)


def stop_recorded(workdir: Path) -> list[str]:
    """`down` for a control plane started by another process: stop the groups state.json names."""
    state_file = Path(workdir) / "state.json"
    if not state_file.exists():
        return []
    pids = json.loads(state_file.read_text())["pids"]
    stopped = []
    for name in STOP_ORDER:
        if name in pids:
            stop_group(pids[name])
            stopped.append(name)
    state_file.unlink()
    return stopped


# --- readiness -----------------------------------------------------------------------------------

def wait_ready(cp: ControlPlane, name: str, probe, timeout: float) -> None:
    """Poll probe() until True; raise ControlPlaneError with the component's log tail when it
    exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        proc = cp.processes[name]
        if proc.poll() is not None:
            raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{log_tail(cp, name)}")
        try:
            if probe():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"{name} not ready after {timeout:.0f}s:\n{log_tail(cp, name)}")
        time.sleep(0.2)


def log_tail(cp: ControlPlane, name: str, chars: int = 3000) -> str:
    try:
        return cp.log(name).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _https_ok(url: str, context: ssl.SSLContext) -> bool:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return response.status == 200 and response.read().strip() == b"ok"


def _insecure() -> ssl.SSLContext:
    """For the /healthz of controller-manager and scheduler: self-signed serving certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- configuration files -------------------------------------------------------------------------

def kubeconfig_text(server: str, ca: Path, user: str, *, cert: Path | None = None, key: Path | None = None,
                    token: str | None = None, namespace: str = "default") -> str:
    """A kubeconfig with one cluster, user and context; the user has a client certificate or a token."""
    creds: dict[str, str] = ({"token": token} if token is not None
                             else {"client-certificate": str(cert), "client-key": str(key)})
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [{"name": "rlhf-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": user, "context": {"cluster": "rlhf-test", "user": user, "namespace": namespace}}],
    }
    return yaml.safe_dump(config, sort_keys=False)


def scheduler_config(kubeconfig: Path) -> dict[str, Any]:
    """KubeSchedulerConfiguration: the default profile and SCHEDULER_NAME with Coscheduling
    (scheduler-plugins manifests/coscheduling/scheduler-config.yaml). Every profile must share one
    queue-sort plugin with the same arguments, so both sort with Coscheduling's (a pod without a
    PodGroup sorts by priority and age, as with the default PrioritySort)."""
    coscheduling_args = {"name": "Coscheduling", "args": {"permitWaitingTimeSeconds": 10}}
    queue_sort = {"enabled": [{"name": "Coscheduling"}], "disabled": [{"name": "*"}]}
    return {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "leaderElection": {"leaderElect": False},
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "profiles": [
            {"schedulerName": "default-scheduler", "plugins": {"queueSort": queue_sort},
             "pluginConfig": [coscheduling_args]},
            {"schedulerName": SCHEDULER_NAME,
             "plugins": {"multiPoint": {"enabled": [{"name": "Coscheduling"}]}, "queueSort": queue_sort},
             "pluginConfig": [coscheduling_args]},
        ],
    }


def storage_class() -> dict[str, Any]:
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS,
                         "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}


# --- start ---------------------------------------------------------------------------------------

def start(workdir: Path, *, tied: bool = True, timeout: float = 180.0, bin_dir: Path | None = None,
          scheduler: bool = True) -> ControlPlane:
    """Start the whole control plane in `workdir` and wait until each part is ready; returns it.

    tied=True (test sessions): the processes die with this one and an atexit hook stops them.
    tied=False (`python -m tests.controlplane up`): they outlive it; `down` stops them.
    scheduler=False: no kube-scheduler (benchmarks of the API path: pods stay unscheduled, and no
    scheduler competes for the CPU or writes PodScheduled conditions).
    Raises ControlPlaneError naming the component that failed, with its log tail; what was
    started is stopped first.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = bin_dir or binaries(workdir / "logs" / "build.log")
    pki = pki_mod.make_pki(workdir / "pki")
    cp = ControlPlane(workdir=workdir, url="", pki=pki, kubeconfig=workdir / "admin.kubeconfig", bin_dir=bin_dir)
    if tied:
        atexit.register(stop, cp)
    try:
        _start_all(cp, tied, timeout, scheduler)
    except BaseException:
        stop(cp)
        raise
    return cp


def _start_all(cp: ControlPlane, tied: bool, timeout: float, scheduler: bool) -> None:
    p, w, b = cp.pki, cp.workdir, cp.bin_dir
    cp.ports = {"etcd": free_port(), "etcd-peer": free_port(), "kube-apiserver": free_port(),
                "kube-controller-manager": free_port(), "kube-scheduler": free_port()}
    etcd_url, peer_url = f"http://127.0.0.1:{cp.ports['etcd']}", f"http://127.0.0.1:{cp.ports['etcd-peer']}"
    spawn(cp, "etcd", [str(b / "etcd"), "--name=rlhf-test", f"--data-dir={w / 'etcd'}",
                       f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                       f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                       f"--initial-cluster=rlhf-test={peer_url}", "--unsafe-no-fsync", "--log-level=warn"], tied)
    wait_ready(cp, "etcd", lambda: json.load(urllib.request.urlopen(f"{etcd_url}/health", timeout=5))["health"]
               == "true", timeout)

    cp.url = f"https://127.0.0.1:{cp.ports['kube-apiserver']}"
    spawn(cp, "kube-apiserver", [
        str(b / "kube-apiserver"), f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={cp.ports['kube-apiserver']}",
        f"--tls-cert-file={p.serving.cert}", f"--tls-private-key-file={p.serving.key}",
        f"--client-ca-file={p.ca_cert}", "--authorization-mode=RBAC",
        "--enable-admission-plugins=PodSecurity,PodNodeSelector",
        f"--service-cluster-ip-range={SERVICE_CIDR}", f"--service-account-issuer={ISSUER}",
        f"--service-account-key-file={p.sa_pub}", f"--service-account-signing-key-file={p.sa_key}",
        f"--cert-dir={w / 'apiserver-certs'}", "--profiling=false",
        # The `kubernetes` Service's endpoints would be 127.0.0.1, which Endpoints validation refuses.
        "--endpoint-reconciler-type=none",
    ], tied)
    context = cp.ssl_context()
    wait_ready(cp, "kube-apiserver", lambda: _https_ok(f"{cp.url}/readyz", context), timeout)

    admin = p.clients["admin"]
    cp.kubeconfig.write_text(kubeconfig_text(cp.url, p.ca_cert, "admin", cert=admin.cert, key=admin.key))
    component_kubeconfig = {}
    for name in ("kube-controller-manager", "kube-scheduler"):
        cred = p.clients[name]
        component_kubeconfig[name] = w / f"{name}.kubeconfig"
        component_kubeconfig[name].write_text(kubeconfig_text(cp.url, p.ca_cert, name, cert=cred.cert, key=cred.key))

    crd, scheduler_rbac = coscheduling_manifests()
    from tests.controlplane import kube  # noqa: PLC0415 - kube imports this module

    kube.kubectl(cp, "apply", "-f", str(crd), "-f", str(VOLCANO_CRD))
    kube.kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump_all([*scheduler_rbac, storage_class()]))
    kube.kubectl(cp, "wait", "--for=condition=Established", "crd/podgroups.scheduling.x-k8s.io",
                 "crd/podgroups.scheduling.volcano.sh", "--timeout=60s")

    kcm = component_kubeconfig["kube-controller-manager"]
    spawn(cp, "kube-controller-manager", [
        str(b / "kube-controller-manager"), f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}",
        f"--authorization-kubeconfig={kcm}", "--bind-address=127.0.0.1",
        f"--secure-port={cp.ports['kube-controller-manager']}", f"--cert-dir={w / 'kcm-certs'}",
        "--leader-elect=false", "--use-service-account-credentials=true",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--service-account-private-key-file={p.sa_key}", f"--root-ca-file={p.ca_cert}",
    ], tied)
    if scheduler:
        scheduler_file = w / "kube-scheduler.yaml"
        scheduler_file.write_text(yaml.safe_dump(scheduler_config(component_kubeconfig["kube-scheduler"])))
        ks = component_kubeconfig["kube-scheduler"]
        spawn(cp, "kube-scheduler", [
            str(b / "kube-scheduler"), f"--config={scheduler_file}", f"--authentication-kubeconfig={ks}",
            f"--authorization-kubeconfig={ks}", "--bind-address=127.0.0.1",
            f"--secure-port={cp.ports['kube-scheduler']}", f"--cert-dir={w / 'scheduler-certs'}",
            # Coscheduling's PreFilter refuses a gang the cluster cannot hold as UnschedulableAndUnresolvable,
            # and it requeues only on Pod and PodGroup events, not on a Node joining: such pods wait for the
            # queue's periodic flush of unschedulable pods (every 30 s, for pods older than this; default 5 min).
            f"--pod-max-in-unschedulable-pods-duration={UNSCHEDULABLE_RETRY}",
        ], tied)
    spawn(cp, "provisioner", [sys.executable, "-m", "tests.controlplane.provisioner", "--kubeconfig",
                              str(cp.kubeconfig), "--root", str(cp.volumes_dir), "--provisioner", PROVISIONER,
                              "--storage-class", STORAGE_CLASS], tied,
          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    insecure = _insecure()
    for name in ("kube-controller-manager", "kube-scheduler")[:2 if scheduler else 1]:
        wait_ready(cp, name, lambda n=name: _https_ok(f"https://127.0.0.1:{cp.ports[n]}/healthz", insecure), timeout)
    # The service-account controller has run once the default namespace has its ServiceAccount.
    wait_ready(cp, "kube-controller-manager", lambda: kube.get_json(cp, "serviceaccount", "default",
                                                                     "-n", "default") is not None, timeout)
    wait_ready(cp, "provisioner", lambda: (cp.workdir / "volumes" / ".ready").exists(), timeout)
