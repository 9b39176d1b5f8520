"""Nodes for the test control plane, with what a kubelet does for the node itself.

- node_manifest(): a Node as a kubelet registers it: capacity and allocatable with `nvidia.com/gpu`
  (fake devices, as the NVIDIA device plugin advertises them), a Ready condition, addresses, node info.
- register(): create the Node (or refresh it) and its Lease in kube-node-lease, owned by the Node as
  the kubelet makes it, so the Node's deletion takes the Lease along.
- Heartbeat: a thread renewing the Leases every LEASE_RENEW_SECONDS, so the controller-manager's node
  lifecycle controller keeps the nodes Ready and untainted (it marks a node whose lease is older than
  its grace period, 50 s by default, NotReady and taints it).
- FakeNodes: nodes that run nothing. The scheduler binds pods to them; their pods stay Pending as
  on a node whose kubelet has not started them yet; a deleted pod is finalized at once (a kubelet
  confirms a graceful deletion with a delete at grace period 0). For scheduling tests.

e2e/kubelet.py (the stand-in kubelet that runs pods) uses register() and Heartbeat for its own node.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.controlplane.cluster import K8S_VERSION

log = logging.getLogger("controlplane.nodes")
GPU = "nvidia.com/gpu"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40  # the kubelet's default nodeLeaseDurationSeconds
LEASE_RENEW_SECONDS = 10.0  # the kubelet renews at a quarter of the lease duration
KUBELET_VERSION = K8S_VERSION  # nodes report the control plane's release
DEFAULT_CAPACITY = {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti", GPU: "8"}


def now_micro() -> str:
    """A metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_seconds() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_manifest(name: str, capacity: dict[str, str] | None = None, labels: dict[str, str] | None = None,
                  address: str = "127.0.0.1") -> dict[str, Any]:
    """A Node named `name` as its kubelet registers it (capacity = allocatable: nothing reserved)."""
    resources = {**DEFAULT_CAPACITY, **(capacity or {})}
    stamp = now_seconds()

    def condition(kind: str, status: str, reason: str) -> dict[str, str]:
        return {"type": kind, "status": status, "reason": reason, "message": "stand-in kubelet",
                "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}

    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                              "kubernetes.io/arch": "amd64", **(labels or {})}},
        "spec": {},
        "status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                           condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                           condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                           condition("Ready", "True", "KubeletReady")],
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "stand-in://0", "kernelVersion": "",
                         "osImage": "stand-in", "machineID": "", "systemUUID": "", "bootID": ""},
        },
    }


def register(api: client.ApiClient, node: dict[str, Any]) -> dict[str, Any]:
    """Create the Node (an existing one gets this status) and its Lease; returns the stored Node."""
    core = client.CoreV1Api(api)
    name = node["metadata"]["name"]
    try:
        core.create_node(node)
    except ApiException as e:
        if e.status != 409:
            raise
    # Status on create is not guaranteed across versions: write it through the status subresource too.
    core.patch_node_status(name, {"status": node["status"]})
    stored = json.loads(core.read_node(name, _preload_content=False).data)
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": name, "namespace": LEASE_NAMESPACE,
                          "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name,
                                               "uid": stored["metadata"]["uid"]}]},
             "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()}}
    coordination = client.CoordinationV1Api(api)
    try:
        coordination.create_namespaced_lease(LEASE_NAMESPACE, lease)
    except ApiException as e:
        if e.status != 409:
            raise
        coordination.patch_namespaced_lease(name, LEASE_NAMESPACE, {"spec": lease["spec"]})
    return stored


class Heartbeat:
    """Renews the Lease of each named node every LEASE_RENEW_SECONDS until stop()."""

    def __init__(self, api: client.ApiClient, names: Iterable[str] = ()):
        self.coordination = client.CoordinationV1Api(api)
        self.names = set(names)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="node-heartbeat")

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def renew(self) -> None:
        for name in sorted(self.names):
            try:
                self.coordination.patch_namespaced_lease(name, LEASE_NAMESPACE, {"spec": {"renewTime": now_micro()}})
            except ApiException as e:
                log.warning("lease of %s not renewed: %s", name, e.reason)

    def _loop(self) -> None:
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            self.renew()


def finalize_deleted(core: client.CoreV1Api, pod: dict[str, Any]) -> None:
    """What a kubelet does once a deleted pod's containers are gone: delete it for good (grace 0),
    guarded by its uid so a new pod of the same name is never hit."""
    meta = pod["metadata"]
    body = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"]))
    try:
        core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body)
    except ApiException as e:
        if e.status not in (404, 409):  # already gone, or a new pod with that name (uid precondition)
            raise


class FakeNodes:
    """Nodes whose pods are bound by the scheduler but never run (Pending), for scheduling tests.

        with FakeNodes(api, {"gpu-1": {"nvidia.com/gpu": "4"}}, labels={"pool": "gang"}) as nodes:
            ...   # pods may bind to gpu-1; nodes.add("gpu-2", {...}) adds one more
        # leaving deletes the nodes and force-deletes the pods still bound to them
    """

    def __init__(self, api: client.ApiClient, nodes: dict[str, dict[str, str]] | None = None,
                 labels: dict[str, str] | None = None):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.labels = dict(labels or {})
        self.heartbeat = Heartbeat(api)
        self._initial = dict(nodes or {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._finalizer_loop, daemon=True, name="fake-nodes")

    def __enter__(self) -> FakeNodes:
        for name, capacity in self._initial.items():
            self.add(name, capacity)
        self.heartbeat.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.heartbeat.stop()
        for name in sorted(self.heartbeat.names):
            self.remove(name)

    def add(self, name: str, capacity: dict[str, str] | None = None) -> dict[str, Any]:
        """Register one more node (capacity overrides DEFAULT_CAPACITY)."""
        stored = register(self.api, node_manifest(name, capacity, self.labels))
        self.heartbeat.names.add(name)
        return stored

    def remove(self, name: str) -> None:
        """Delete the node and every pod bound to it (grace 0: nothing runs them)."""
        self.heartbeat.names.discard(name)
        for pod in self.bound_pods(name):
            finalize_deleted(self.core, pod)
        try:
            self.core.delete_node(name)
        except ApiException as e:
            if e.status != 404:
                raise

    def bound_pods(self, name: str) -> list[dict[str, Any]]:
        got = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}", _preload_content=False)
        return json.loads(got.data)["items"]

    def _finalize_if_deleted(self, pod: dict[str, Any]) -> None:
        if pod["metadata"].get("deletionTimestamp") and pod["spec"].get("nodeName") in self.heartbeat.names:
            finalize_deleted(self.core, pod)

    def _finalizer_loop(self) -> None:
        """List every pod, then follow the watch from that list's resourceVersion (a watch wakes the
        pass at once; the periodic relist covers a broken watch)."""
        while not self._stop.is_set():
            try:
                listed = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)
                for pod in listed["items"]:
                    self._finalize_if_deleted(pod)
                for event in watch.Watch().stream(self.core.list_pod_for_all_namespaces,
                                                  resource_version=listed["metadata"]["resourceVersion"],
                                                  timeout_seconds=10, _request_timeout=15):
                    if self._stop.is_set():
                        return
                    self._finalize_if_deleted(event["raw_object"])
            except Exception as e:  # noqa: BLE001 - keep finalizing; the next pass retries
                log.debug("fake nodes pass: %s", e)
                self._stop.wait(0.5)
