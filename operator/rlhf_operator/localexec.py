"""Pods as local process groups: the part of a kubelet the local runner and the e2e stand-in share.

Three pieces, each usable alone:

- translate_pod(): a built pod dict -> ProcessSpec (argv, env, log and termination-log files).
  Mount paths in env values become local folders (and, through rewrite_json_paths, the paths under a
  claim's mount in the trainer config file: a process has no mount namespace to see /sources/<job> in), cluster addresses in RLHF_ROLE_ADDRS /
  RLHF_BRIDGE_ADDR go through a resolver (127.0.0.1 + free ports locally), downward-API env
  (POD_IP, metadata.name) is filled in, and `python` becomes this interpreter.
- Supervisor: starts each ProcessSpec as its own process group (start_new_session) so stopping a
  pod kills everything it spawned; stop() is SIGTERM, a grace period, then SIGKILL. Every exit
  sets `changed`, an Event the caller waits on instead of polling. On a machine with GPUs it hands
  each pod the `nvidia.com/gpu` it asks for as CUDA_VISIBLE_DEVICES, GPUs no running pod holds (as a
  device plugin does: a pod that asks for none sees none), so two pods never share a GPU.
- pod_status(): a process state -> the pod `status` dict a kubelet would write (phase, podIP,
  containerStatuses with exitCode and the termination message), so the real planner reads it.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhf_contract import wire

from rlhf_operator import builders

# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_TERMINATION_MESSAGE = 4096
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9_.\-\[\]:]+?):(?P<port>\d+)$")

Resolver = Callable[[str, int], tuple[str, int]]


@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to start one pod's container as a local process."""

    name: str  # pod name
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    log_path: Path
    termination_log: Path
    gpus: int = 0  # the container's nvidia.com/gpu limit


class GpuShortage(RuntimeError):
    """A pod asks for more GPUs than this machine has free."""


def visible_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """This machine's GPUs as CUDA names them: CUDA_VISIBLE_DEVICES when set (the user's choice of GPUs
    for the run), else the indices nvidia-smi lists, else none (a CPU machine)."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def assign_gpus(visible: list[str], busy: set[str], count: int, pod: str) -> tuple[str, ...]:
    """The first `count` of `visible` that no running pod holds, for `pod`.

    Raises GpuShortage (naming the pod, the count and what is held) when fewer are free.
    """
    free = [g for g in visible if g not in busy]
    if count > len(free):
        raise GpuShortage(f"pod {pod} asks for {count} GPU(s) (nvidia.com/gpu) but this machine has {len(free)} free "
                          f"of {len(visible)} ({len(busy)} held by running pods): lower the roles' gpus or replicas, "
                          f"or colocate roles (colocateWith)")
    return tuple(free[:count])


def utc_now() -> str:
    return wire.format_time(datetime.datetime.now(datetime.UTC))


# Ports below the kernel's ephemeral range, which bind(0) and outgoing connections never take.
_PICKED_PORTS_LOW = 15000
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_RANGE = (32768, 60999)  # Linux's default
_RESERVATIONS_KEPT = 64
_reservations: list[socket.socket] = []
_reservations_lock = threading.Lock()


def ephemeral_range(text: str | None = None) -> tuple[int, int]:
    """The kernel's ephemeral port range (inclusive), from ip_local_port_range or Linux's default."""
    try:
        low, high = (int(v) for v in (text if text is not None else _EPHEMERAL_RANGE_FILE.read_text()).split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL_RANGE
    return low, high


def pickable_ports(ephemeral: tuple[int, int]) -> list[range]:
    """Port ranges free_port picks from: those outside the ephemeral range (empty if it spans all)."""
    low, high = ephemeral
    return [r for r in (range(_PICKED_PORTS_LOW, low), range(high + 1, 65536)) if len(r)]


def free_port(host: str = "127.0.0.1", *, attempts: int = 200) -> int:
    """A port nothing on this machine holds, reserved for whoever this process hands it to.

    Two rules close the race between picking a port and a server binding it, which a plain bind(0)
    leaves open when several runs share a machine (CI's parallel test workers hit EADDRINUSE in a
    trainer's TCPStore):
    - the port comes from outside the ephemeral range, so no other process's bind(0) or outgoing
      connection takes it in the meantime;
    - this process keeps it bound with SO_REUSEADDR (not listening; the last 64 picks), so another
      free_port anywhere sees it taken, while the server it is meant for (TCPStore, Go and Python
      HTTP servers all set SO_REUSEADDR) still binds and listens on it.
    Falls back to bind(0) when the ephemeral range leaves nothing outside it.
    """
    choices = pickable_ports(ephemeral_range())
    rng = random.SystemRandom()
    for _ in range(attempts if choices else 0):
        ports = rng.choices(choices, weights=[len(r) for r in choices])[0]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            port = rng.choice(ports)
            sock.bind((host, port))  # without SO_REUSEADDR: refused while anyone holds or reserves it
        except OSError:
            sock.close()
            continue
        _reserve(sock)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _reserve(sock: socket.socket) -> None:
    """Keep sock bound, now with SO_REUSEADDR: set after the bind, it lets the real server bind the
    port while every plain probe (another free_port) is still refused."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with _reservations_lock:
        _reservations.append(sock)
        while len(_reservations) > _RESERVATIONS_KEPT:
            _reservations.pop(0).close()


class LocalAddresses:
    """Stand-in for cluster DNS on one machine: every (gang attempt, host, port) seen gets its own
    free port on 127.0.0.1. All pods of one attempt resolve the same name to the same port; a new
    attempt gets new ports, so a restarted gang never races sockets the old one left in TIME_WAIT.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._ports: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()

    def resolver(self, attempt: str) -> Resolver:
        def resolve(host: str, port: int) -> tuple[str, int]:
            with self._lock:
                key = (attempt, host, port)
                if key not in self._ports:
                    taken = set(self._ports.values())
                    new = free_port(self.host)
                    while new in taken:
                        new = free_port(self.host)
                    self._ports[key] = new
                return self.host, self._ports[key]

        return resolve


def rewrite_addresses(value: str, resolve: Resolver) -> str:
    """Rewrite `host:port` or `name=host:port,...` through resolve (kept as is if not an address)."""
    out = []
    for item in value.split(","):
        key, eq, addr = item.rpartition("=")
        m = _HOST_PORT.match(addr.strip())
        if not m:
            out.append(item)
            continue
        host, port = resolve(m["host"], int(m["port"]))
        out.append(f"{key}{eq}{host}:{port}")
    return ",".join(out)


def rewrite_mount_path(value: str, mounts: Mapping[str, Path]) -> str:
    """`/etc/rlhf/config.json` -> `<local config dir>/config.json` for the longest matching mount."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + value[len(mount.rstrip("/")):]
    return value


def rewrite_json_paths(text: str, mounts: Mapping[str, Path]) -> str:
    """A JSON document with every string value under one of `mounts` rewritten by rewrite_mount_path
    (the trainer config's model paths under a source claim's mount); other text is returned as is."""
    if not mounts:
        return text
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return text

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return rewrite_mount_path(value, mounts)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return json.dumps(walk(doc), indent=2, sort_keys=True)


def absolute_search_path(value: str, cwd: Path) -> str:
    """A PYTHONPATH with its relative (and empty = current folder) entries made absolute against `cwd`.

    Each local pod runs in its own folder, so `PYTHONPATH=. rlhf-operator run-local job.yaml` must
    mean the folder the user ran it from (where a `reward.callable` module lives), not the pod's.
    """
    return os.pathsep.join(str(cwd / entry) if not os.path.isabs(entry) else entry
                           for entry in value.split(os.pathsep))


def trainer_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = pod["spec"]["containers"]
    return next((c for c in containers if c.get("name") == wire.CONTAINER_NAME), containers[0])


def field_ref_value(pod: Mapping[str, Any], path: str, pod_ip: str) -> str:
    """The downward API fields a trainer pod uses."""
    meta = pod.get("metadata", {})
    values = {
        "status.podIP": pod_ip,
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", "default"),
        "spec.nodeName": "localhost",
    }
    if path.startswith("metadata.labels['"):
        return meta.get("labels", {}).get(path[len("metadata.labels['"):-2], "")
    if path not in values:
        raise ValueError(f"pod {meta.get('name')}: env fieldRef {path!r} is not supported locally")
    return values[path]


def local_argv(container: Mapping[str, Any], python: str) -> tuple[str, ...]:
    """The container's command + args, `python` replaced by the interpreter that has the trainer."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if not argv:
        raise ValueError(f"container {container.get('name')}: no command (local pods need one)")
    if argv[0] in ("python", "python3"):
        argv[0] = python
    return tuple(argv)


def translate_pod(
    pod: Mapping[str, Any],
    *,
    mounts: Mapping[str, Path],
    resolve: Resolver,
    pod_ip: str,
    pod_dir: Path,
    metrics_port: int,
    python: str = sys.executable,
    command: Iterable[str] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> ProcessSpec:
    """A pod dict (as built by builders.build_gang) -> how to run it here.

    mounts: container mount path -> local folder; resolve: cluster host:port -> local host:port;
    command: replaces the container's command (tests run a fake trainer through it).
    """
    container = trainer_container(pod)
    name = pod["metadata"]["name"]
    env = dict(os.environ if base_env is None else base_env)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = absolute_search_path(env["PYTHONPATH"], Path.cwd())
    # N role processes share a few cores: one intra-op thread each unless the user chose otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # Init containers (the source initializer) run first in the same process group, their env merged
    # under the trainer's: one process per pod, so a stop or a failure reads as the pod's.
    for init in pod["spec"].get("initContainers", []):
        env.update(_container_env(pod, init, mounts, resolve, pod_ip, metrics_port))
    env.update(_container_env(pod, container, mounts, resolve, pod_ip, metrics_port))
    env[wire.ENV_POD_IP] = pod_ip
    termination_log = pod_dir / "termination-log"
    # Where the trainer writes its last words; a kubelet reads /dev/termination-log instead.
    env[wire.ENV_TERMINATION_LOG] = str(termination_log)
    argv = tuple(command) if command is not None else local_argv(container, python)
    inits = [tuple(rewrite_mount_path(a, mounts) for a in local_argv(c, python))
             for c in pod["spec"].get("initContainers", [])]
    if inits:
        argv = ("sh", "-c", " && ".join([*(shlex.join(a) for a in inits), "exec " + shlex.join(argv)]))
    gpus = int((container.get("resources") or {}).get("limits", {}).get(builders.GPU_RESOURCE, 0))
    return ProcessSpec(name, argv, env, pod_dir, pod_dir / "log.txt", termination_log, gpus)


def _container_env(pod: Mapping[str, Any], container: Mapping[str, Any], mounts: Mapping[str, Path],
                   resolve: Resolver, pod_ip: str, metrics_port: int) -> dict[str, str]:
    """A container's env as a local process sees it (mount paths, addresses and ports rewritten)."""
    name = pod["metadata"]["name"]
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "fieldRef" in var.get("valueFrom", {}):
            value = field_ref_value(pod, var["valueFrom"]["fieldRef"]["fieldPath"], pod_ip)
        elif "secretKeyRef" in var.get("valueFrom", {}):
            # No Secrets here: the runner's own env passes the variable through (e.g. WANDB_API_KEY).
            continue
        elif "valueFrom" in var:
            raise ValueError(f"pod {name}: env {var['name']}: only value, fieldRef and secretKeyRef are supported locally")
        else:
            # An empty value is stored without its `value` key (the API server omits empty strings).
            value = str(var.get("value", ""))
        if var["name"] in wire.ADDRESS_ENV:
            value = rewrite_addresses(value, resolve)
        elif var["name"] == wire.ENV_METRICS_PORT:
            value = str(metrics_port)
        else:
            value = rewrite_mount_path(value, mounts)
        env[var["name"]] = value
    return env


@dataclass
class LocalProcess:
    spec: ProcessSpec
    popen: subprocess.Popen
    started_at: str
    started_monotonic: float
    finished_at: str = ""
    stop_requested: bool = False
    _watcher: threading.Thread | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int | None:
        """None while running; a kill by signal N reads 128+N, as a kubelet reports it."""
        rc = self.popen.poll()
        if rc is None:
            return None
        return 128 - rc if rc < 0 else rc

    def termination_message(self) -> str:
        try:
            return self.spec.termination_log.read_text(errors="replace")[-MAX_TERMINATION_MESSAGE:]
        except OSError:
            return ""


class Supervisor:
    """Local process groups by pod name. Thread-safe; `changed` is set whenever one exits.

    gpus: the machine's GPUs (visible_gpus() when None); with none, pods start with the runner's env as is.
    """

    def __init__(self, gpus: list[str] | None = None) -> None:
        self.changed = threading.Event()
        self._procs: dict[str, LocalProcess] = {}
        self._lock = threading.Lock()
        self.gpus = visible_gpus() if gpus is None else list(gpus)

    def _held_gpus(self) -> set[str]:
        """GPUs of running pods (a finished pod's are free, as a kubelet frees a completed pod's)."""
        return {g for p in self._procs.values() if p.popen.poll() is None
                for g in p.spec.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g}

    def start(self, spec: ProcessSpec) -> LocalProcess:
        """Start the pod's process group. Raises GpuShortage when its GPUs are not free."""
        with self._lock:
            if spec.name in self._procs:
                raise ValueError(f"pod {spec.name} already has a process")
            if self.gpus:
                ids = assign_gpus(self.gpus, self._held_gpus(), spec.gpus, spec.name)
                spec = replace(spec, env={**spec.env, "CUDA_VISIBLE_DEVICES": ",".join(ids)})
            spec.cwd.mkdir(parents=True, exist_ok=True)
            spec.termination_log.unlink(missing_ok=True)
            with open(spec.log_path, "ab") as log:
                popen = subprocess.Popen(
                    list(spec.argv), env=dict(spec.env), cwd=spec.cwd, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            proc = LocalProcess(spec, popen, utc_now(), time.monotonic())
            proc._watcher = threading.Thread(target=self._watch, args=(proc,), daemon=True,
                                             name=f"watch-{spec.name}")
            proc._watcher.start()
            self._procs[spec.name] = proc
            return proc

    def _watch(self, proc: LocalProcess) -> None:
        proc.popen.wait()
        proc.finished_at = utc_now()
        self.changed.set()

    def get(self, name: str) -> LocalProcess | None:
        with self._lock:
            return self._procs.get(name)

    def processes(self) -> dict[str, LocalProcess]:
        with self._lock:
            return dict(self._procs)

    def stop(self, names: Iterable[str], grace: float = 5.0) -> list[LocalProcess]:
        """SIGTERM each pod's whole process group, wait up to grace, SIGKILL what is left, forget them.
        Returns the stopped processes: their exit codes are the pods' last words."""
        with self._lock:
            procs = [self._procs.pop(n) for n in names if n in self._procs]
        for p in procs:
            p.stop_requested = True
            _signal_group(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            # The leader may be gone while children it spawned live on in its group: kill the group.
            _signal_group(p.popen.pid, signal.SIGKILL)
            p.popen.wait()
        if procs:
            self.changed.set()
        return procs

    def stop_all(self, grace: float = 5.0) -> None:
        self.stop(list(self.processes()), grace)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> bool:
        """Fault injection: signal a pod's process group without forgetting it (it shows as Failed)."""
        p = self.get(name)
        if p is None or p.exit_code is not None:
            return False
        _signal_group(p.popen.pid, sig)
        return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pod_status(proc: LocalProcess | None, pod_ip: str) -> dict[str, Any]:
    """The `status` a kubelet writes for a pod whose container is (or was) this process.

    No process yet -> Pending; running -> Running; exit 0 -> Succeeded; else Failed with exitCode
    and the termination message, which is what the planner classifies (65/78 permanent).
    """
    if proc is None:
        return {"phase": "Pending"}
    code = proc.exit_code
    base = {"podIP": pod_ip, "hostIP": pod_ip, "startTime": proc.started_at}
    if code is None:
        state = {"running": {"startedAt": proc.started_at}}
        return {**base, "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [_container_status(state, ready=True)]}
    terminated = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": proc.started_at,
        "finishedAt": proc.finished_at or utc_now(),
    }
    message = proc.termination_message()
    if message:
        terminated["message"] = message
    if code >= 128:
        terminated["signal"] = code - 128
    return {**base, "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [_container_status({"terminated": terminated}, ready=False)]}


def _container_status(state: dict[str, Any], *, ready: bool) -> dict[str, Any]:
    return {"name": wire.CONTAINER_NAME, "ready": ready, "restartCount": 0, "state": state,
            "image": "local", "imageID": "", "started": ready}
