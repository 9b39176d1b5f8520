"""A stand-in kubelet: registers a GPU Node and runs the pods the scheduler binds to it as local
process groups.

On start it registers its Node (tests/controlplane/nodes.py: capacity with `nvidia.com/gpu`, a Ready
condition, a Lease renewed like a kubelet's so the node lifecycle controller never taints it). Then,
like a kubelet, it lists and watches the pods whose spec.nodeName is its node (field selector), and
for each new pod of a job (label rlhf.dev/job):

- materialises its volumes: a configMap volume -> a folder with the ConfigMap's keys as files (read
  from the API), a persistentVolumeClaim -> the hostPath folder of the PersistentVolume bound to the
  claim (tests/controlplane/provisioner.py provisions them; a mount's subPath is a folder inside it),
  any other volume -> a per-pod folder; env values under a mount path are rewritten to those folders,
  and so are the trainer config's paths under a claim's mount (a fromJob source's /sources/<job>);
- stands in for cluster DNS: each pod gets its own loopback address 127.X.Y.Z as podIP (so the
  trainer's /metrics on POD_IP:9400 is reachable by the operator exactly as in a cluster), while
  rendezvous addresses in RLHF_ROLE_ADDRS / RLHF_BRIDGE_ADDR become 127.0.0.1 with a free port per
  (restart attempt, name, port), because torch's TCPStore binds every interface and several pods
  would collide on 29500 otherwise;
- starts `python -m rlhf_trainer` with this interpreter (rlhf_operator.localexec), and patches the
  pod's status subresource like a kubelet: Running with podIP, then Succeeded / Failed with
  exitCode and the termination message;
- on a deletion it stops the pod's process group as a kubelet stops a container: SIGTERM, up to the
  pod's grace period (termination_grace_seconds: the deletion's metadata.deletionGracePeriodSeconds,
  else spec.terminationGracePeriodSeconds, at least 2 s), then SIGKILL; each pod on a thread of its
  own, so a long grace holds up no other pod. It then writes the container's final state (exit code,
  termination message) to the pod's status and confirms a graceful deletion with a delete at grace
  period 0, as a kubelet does: until then the API server keeps the pod, so a new pod of the same
  name cannot be created.

Level-based: a watch wakes the loop, and a periodic list resyncs, so a missed event only delays.
Pods are known by name: a node serves one job namespace (the e2e namespace's PodNodeSelector
pins its pods to this node's pool).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from rlhf_contract import wire
from rlhf_operator import localexec

from tests.controlplane import nodes

log = logging.getLogger("e2e.kubelet")
RESYNC_SECONDS = 1.0
# The kubelet never gives a container less than this after SIGTERM (kuberuntime's
# minimumGracePeriodInSeconds), not even on a deletion at grace period 0 (`kubectl delete --force`).
MIN_GRACE_SECONDS = 2.0


def termination_grace_seconds(pod: dict[str, Any] | None) -> float:
    """Seconds from SIGTERM to SIGKILL when `pod` is stopped, as the kubelet's killContainer takes them:
    metadata.deletionGracePeriodSeconds (the API server sets it from the delete's gracePeriodSeconds, else
    the pod's own), else spec.terminationGracePeriodSeconds, else the minimum; never under
    MIN_GRACE_SECONDS. None (a pod gone from the API before its deletion was seen: a forced deletion)
    gets the minimum."""
    if pod is None:
        return MIN_GRACE_SECONDS
    grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if grace is None:
        grace = pod.get("spec", {}).get("terminationGracePeriodSeconds")
    return max(MIN_GRACE_SECONDS, float(grace if grace is not None else 0))


class PodIPs:
    """Distinct loopback addresses, one per pod object (uid); a random /16 per kubelet instance so
    two test sessions on one machine do not hand out the same address."""

    def __init__(self) -> None:
        self._base = random.randint(10, 250)
        self._counter = itertools.count(2)
        self._ips: dict[str, str] = {}

    def ip_for(self, uid: str) -> str:
        if uid not in self._ips:
            n = next(self._counter)
            self._ips[uid] = f"127.{self._base}.{n // 250}.{n % 250 + 2}"
        return self._ips[uid]


def config_error_status(message: str) -> dict[str, Any]:
    """A pod the kubelet cannot start (a kubelet's CreateContainerConfigError): Pending, waiting."""
    return {"phase": "Pending", "containerStatuses": [{
        "name": wire.CONTAINER_NAME, "ready": False, "restartCount": 0, "image": "local", "imageID": "",
        "state": {"waiting": {"reason": "CreateContainerConfigError", "message": message[:1000]}}}]}


class StandInKubelet:
    """The kubelet of Node `node_name` (labels `node_labels`, capacity over nodes.DEFAULT_CAPACITY)."""

    def __init__(self, kubeconfig: Path, root: Path, node_name: str, node_labels: dict[str, str] | None = None,
                 capacity: dict[str, str] | None = None, stop_grace: float = 5.0,
                 addresses: localexec.LocalAddresses | None = None):
        """addresses: the cluster-DNS stand-in; kubelets of one cluster share one, so that pods on
        different nodes resolve a rendezvous name to the same local port. stop_grace: SIGTERM to SIGKILL
        for the processes still running when the kubelet itself stops (a deleted pod gets its own grace)."""
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.api = client.CoreV1Api(self.api_client)
        self.root = Path(root)
        self.node_name = node_name
        self.node = nodes.node_manifest(node_name, capacity, node_labels)
        self.stop_grace = stop_grace
        self.supervisor = localexec.Supervisor()
        self.addresses = addresses or localexec.LocalAddresses()
        self.ips = PodIPs()
        self.heartbeat = nodes.Heartbeat(self.api_client, [node_name])
        self.known: dict[str, dict[str, Any]] = {}  # pod name -> pod as first seen
        self.reported: dict[str, dict[str, Any]] = {}  # pod name -> last status patched
        self.starts: Counter[str] = Counter()  # pod name -> processes started for it
        self.logs: dict[str, list[Path]] = {}  # pod name -> log files of every process run for it
        self.config_errors: dict[str, str] = {}  # pod name -> why it could not be started
        self.stopped: dict[str, list[int]] = {}  # pod name -> exit code of each process stopped by a deletion
        self.terminating: set[str] = set()  # pod names whose process is being stopped (a thread each)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> StandInKubelet:
        nodes.register(self.api_client, self.node)
        self.heartbeat.start()
        for target in (self._watch_loop, self._sync_loop):
            t = threading.Thread(target=target, daemon=True, name=f"kubelet-{self.node_name}-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self, delete_node: bool = False) -> None:
        """Stop the loops and every process; delete_node=True also removes the Node and force-deletes
        the pods still bound to it (a node taken out of the cluster)."""
        self._stop.set()
        self.supervisor.changed.set()
        for t in self._threads:
            t.join(timeout=1)  # daemon threads: a watch blocked in a read ends with the process
        self.heartbeat.stop()
        self.supervisor.stop_all(self.stop_grace)
        if delete_node:
            for pod in self._list_pods():
                nodes.finalize_deleted(self.api, pod)
            try:
                self.api.delete_node(self.node_name)
            except ApiException as e:
                if e.status != 404:
                    raise

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The folder of the PersistentVolume bound to `claim` (its hostPath). Raises LookupError
        while the claim does not exist or is not bound yet."""
        try:
            pvc = self.api.read_namespaced_persistent_volume_claim(claim, namespace)
        except ApiException as e:
            if e.status == 404:
                raise LookupError(f"claim {namespace}/{claim} does not exist") from e
            raise
        if not pvc.spec.volume_name:
            raise LookupError(f"claim {namespace}/{claim} is not bound to a volume yet")
        pv = self.api.read_persistent_volume(pvc.spec.volume_name)
        return Path(pv.spec.host_path.path)

    # -- loops ----------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        """Wake the sync loop on any event of this node's pods (the resync catches anything missed)."""
        while not self._stop.is_set():
            try:
                for _ in watch.Watch().stream(self.api.list_pod_for_all_namespaces, timeout_seconds=5,
                                              field_selector=f"spec.nodeName={self.node_name}",
                                              _request_timeout=10):
                    self.supervisor.changed.set()
                    if self._stop.is_set():
                        return
            except Exception as e:  # noqa: BLE001 - a broken watch only delays; the resync covers it
                log.debug("pod watch restarts: %s", e)
                self._stop.wait(0.2)

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self.supervisor.changed.clear()
            try:
                self.sync_once()
            except Exception:  # noqa: BLE001 - keep playing the kubelet; the next pass retries
                log.exception("kubelet sync failed")
            self.supervisor.changed.wait(RESYNC_SECONDS)

    def sync_once(self) -> None:
        listed = self._list_pods()
        deleting = {p["metadata"]["name"]: p for p in listed if p["metadata"].get("deletionTimestamp")}
        pods = {p["metadata"]["name"]: p for p in listed if not p["metadata"].get("deletionTimestamp")}
        gone = [n for n in self.known if n not in pods or pods[n]["metadata"]["uid"] != self.known[n]["metadata"]["uid"]]
        for name in gone:
            known = self.known.pop(name)
            self.reported.pop(name, None)
            self.config_errors.pop(name, None)
            seen = deleting.get(name)
            self._terminate_async(known, seen if seen and seen["metadata"]["uid"] == known["metadata"]["uid"] else None)
        with self._lock:
            terminating = set(self.terminating)
        for name, pod in deleting.items():  # never started, or already stopped: confirm the deletion
            if name not in terminating and name not in gone:
                nodes.finalize_deleted(self.api, pod)
        for name, pod in pods.items():
            # A pod of a name whose previous process is still in its grace period starts once that one ended.
            if name not in self.known and name not in terminating \
                    and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                self.known[name] = pod
                try:
                    self._start_pod(pod)
                except (ValueError, ApiException) as err:  # the pod cannot be run as it is: say so, as a kubelet
                    self.config_errors[name] = str(err)
        for name, pod in self.known.items():
            status = localexec.pod_status(self.supervisor.get(name), self.ips.ip_for(pod["metadata"]["uid"]))
            if name in self.config_errors:
                status = config_error_status(self.config_errors[name])
            if status != self.reported.get(name):
                self._patch_status(pod, status)

    def _terminate_async(self, pod: dict[str, Any], deleting: dict[str, Any] | None) -> None:
        """Stop a deleted pod's process on a thread of its own (see _terminate)."""
        name = pod["metadata"]["name"]
        with self._lock:
            self.terminating.add(name)
        threading.Thread(target=self._terminate, args=(pod, deleting), daemon=True,
                         name=f"kubelet-stop-{name}").start()

    def _terminate(self, pod: dict[str, Any], deleting: dict[str, Any] | None) -> None:
        """SIGTERM the pod's process group, wait up to its grace period (termination_grace_seconds of the
        deleting pod; a forced deletion seen only as a vanished pod gets the minimum), SIGKILL what is left;
        then report the container's final state and confirm the deletion (a pod still in the API)."""
        name = pod["metadata"]["name"]
        try:
            grace = termination_grace_seconds(deleting)
            proc = self.supervisor.get(name)
            if proc is not None and self.supervisor.kill(name, signal.SIGTERM):
                log.info("stopping %s: SIGTERM, grace %gs", name, grace)
                deadline = time.monotonic() + grace
                while proc.exit_code is None and time.monotonic() < deadline and not self._stop.is_set():
                    try:
                        proc.popen.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                    except subprocess.TimeoutExpired:
                        pass
            stopped = self.supervisor.stop([name], 0.0)  # SIGKILL the group if anything is left, forget it
            if stopped:
                code = stopped[0].exit_code
                self.stopped.setdefault(name, []).append(code)
                log.info("stopped %s: exit %s", name, code)
                if deleting is not None:
                    final = localexec.pod_status(stopped[0], self.ips.ip_for(pod["metadata"]["uid"]))
                    self._patch_status(deleting, final, record=False)
            if deleting is not None:
                nodes.finalize_deleted(self.api, deleting)
        except Exception:  # noqa: BLE001 - the resync finalizes a pod this thread could not
            log.exception("stopping %s failed", name)
        finally:
            with self._lock:
                self.terminating.discard(name)
            self.supervisor.changed.set()

    def _list_pods(self) -> list[dict[str, Any]]:
        result = self.api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node_name}",
                                                      label_selector=wire.LABEL_JOB, _preload_content=False)
        return json.loads(result.data)["items"]

    # -- one pod --------------------------------------------------------------------------------
    def _volume_dir(self, pod: dict[str, Any], volume: dict[str, Any]) -> Path:
        if "persistentVolumeClaim" in volume:
            return self.claim_dir(pod["metadata"]["namespace"], volume["persistentVolumeClaim"]["claimName"])
        return self.root / "pods" / pod["metadata"]["uid"] / "volumes" / volume["name"]

    def _start_pod(self, pod: dict[str, Any]) -> None:
        name, uid, namespace = pod["metadata"]["name"], pod["metadata"]["uid"], pod["metadata"]["namespace"]
        attempt = pod["metadata"].get("labels", {}).get(wire.LABEL_RESTART_ATTEMPT, "0")
        pod_dir = self.root / "pods" / uid
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: dict[str, Path] = {}
        claim_mounts: dict[str, Path] = {}  # a fromJob source's export: the trainer config names its mount
        config_maps: list[tuple[Path, str]] = []
        for m in localexec.trainer_container(pod).get("volumeMounts", []):
            vol = volumes.get(m["name"], {"name": m["name"]})
            folder = self._volume_dir(pod, vol)
            folder = folder / m["subPath"] if m.get("subPath") else folder
            folder.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                config_maps.append((folder, vol["configMap"]["name"]))
            if "persistentVolumeClaim" in vol:
                claim_mounts[m["mountPath"]] = folder
            mounts[m["mountPath"]] = folder
        for folder, config_map in config_maps:
            cm = self.api.read_namespaced_config_map(config_map, namespace)
            for key, text in (cm.data or {}).items():
                (folder / key).write_text(localexec.rewrite_json_paths(text, claim_mounts)
                                          if key == wire.CONFIG_FILE else text)
        metrics_port = next((int(e["value"]) for e in localexec.trainer_container(pod).get("env", [])
                             if e["name"] == "RLHF_METRICS_PORT" and "value" in e), 0)
        spec = localexec.translate_pod(pod, mounts=mounts, resolve=self.addresses.resolver(attempt),
                                       pod_ip=self.ips.ip_for(uid), pod_dir=pod_dir, metrics_port=metrics_port,
                                       base_env={**os.environ, **self._secret_env(pod)})
        spec.cwd.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "a") as log_file:
            log_file.write(f"--- {localexec.utc_now()} start {name} attempt {attempt}: {' '.join(spec.argv)}\n")
        self.supervisor.start(spec)
        self.starts[name] += 1
        self.logs.setdefault(name, []).append(spec.log_path)
        log.info("started %s (attempt %s) pid %s", name, attempt, self.supervisor.get(name).popen.pid)

    def _secret_env(self, pod: dict[str, Any]) -> dict[str, str]:
        """The container's secretKeyRef env read from the Secrets, as a kubelet does (a missing Secret or key
        leaves the pod in CreateContainerConfigError; an optional one is skipped)."""
        env = {}
        for var in localexec.trainer_container(pod).get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                continue
            try:
                data = self.api.read_namespaced_secret(ref["name"], pod["metadata"]["namespace"]).data or {}
            except ApiException as err:
                if err.status != 404:
                    raise
                if ref.get("optional"):
                    continue
                raise ValueError(f'secret "{ref["name"]}" not found') from None
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ValueError(f'couldn\'t find key {ref["key"]} in Secret {pod["metadata"]["namespace"]}/{ref["name"]}')
            env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
        return env

    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any], record: bool = True) -> None:
        """Write `status` to the pod's status subresource; record: remember it as the last one reported."""
        name = pod["metadata"]["name"]
        try:
            self.api.patch_namespaced_pod_status(name, pod["metadata"]["namespace"], {"status": status})
            if record:
                self.reported[name] = status
        except ApiException as e:
            if e.status != 404:  # a pod deleted meanwhile is stopped on the next pass
                raise

    # -- fault injection --------------------------------------------------------------------------
    def running_pods(self) -> list[str]:
        return [n for n, p in self.supervisor.processes().items() if p.exit_code is None]

    def kill_pod_process(self, name: str) -> bool:
        """SIGKILL a pod's process group, as an OOM kill or a node loss would (the pod turns Failed, 137)."""
        killed = self.supervisor.kill(name)
        self.supervisor.changed.set()
        return killed

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any(p.exit_code is None for p in self.supervisor.processes().values()):
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in kubelet: processes still running")
            time.sleep(0.05)
