"""Execute a planner's actions against the Kubernetes API.

Idempotent by name: a create that meets 409 AlreadyExists and a delete that meets 404 NotFound both
count as done, so a pass can be repeated after any crash. Writes are raw JSON requests through the
official client's connection pool (no model (de)serialisation: it costs more than the request),
run on a thread pool so that one pass sends its creates concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kubernetes
import urllib3

from rlhf_operator import constants

log = logging.getLogger(__name__)

# Resource paths of every kind the operator writes: (apiVersion, kind) -> plural.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Pod"): "pods",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Event"): "events",
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): "podgroups",
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"): "podgroups",
    (constants.API_VERSION, constants.KIND): constants.PLURAL,
}


class ApiError(Exception):
    """An API request failed with a status that retrying later may fix (the pass is requeued)."""

    def __init__(self, method: str, path: str, status: int, body: str):
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]}")


def resource_path(api_version: str, kind: str, namespace: str, name: str = "", subresource: str = "") -> str:
    """REST path of a namespaced object (or its collection when name is empty)."""
    try:
        plural = PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} of {api_version}") from None
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def status_merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch turning status `old` into `new` (top-level keys new lacks are set to null)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def event_body(job: dict[str, Any], type_: str, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """A core v1 Event about the job, as `kubectl describe rlhfjob` shows it."""
    meta = job["metadata"]
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": constants.API_VERSION, "kind": constants.KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid", ""),
                           "resourceVersion": meta.get("resourceVersion", "")},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": constants.FIELD_MANAGER}, "reportingComponent": constants.FIELD_MANAGER,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


def load_client_config(pool_size: int) -> kubernetes.client.Configuration:
    """In-cluster service account when present, else $KUBECONFIG / ~/.kube/config."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)
    config.connection_pool_maxsize = pool_size
    return config


@dataclass
class KubeApi:
    """The few raw REST calls the operator makes, each run on the thread pool."""

    client: kubernetes.client.ApiClient
    pool: ThreadPoolExecutor
    timeout: float = 10.0

    @classmethod
    def connect(cls, concurrency: int = 16) -> KubeApi:
        client = kubernetes.client.ApiClient(load_client_config(concurrency))
        return cls(client=client, pool=ThreadPoolExecutor(concurrency, thread_name_prefix="kube-api"))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                 query: Iterable[tuple[str, str]] = ()) -> tuple[int, bytes]:
        params = self.client.param_serialize(
            method, path, query_params=list(query), body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": "application/json"})
        response = self.client.call_api(*params, _request_timeout=self.timeout)
        return response.status, response.read()

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                      query: Iterable[tuple[str, str]] = (), ok: tuple[int, ...] = ()) -> int:
        """Send one request; 2xx and the statuses in `ok` return the status, any other raises ApiError."""
        loop = asyncio.get_running_loop()
        try:
            status, data = await loop.run_in_executor(
                self.pool, lambda: self._request(method, path, body, content_type, tuple(query)))
        except (urllib3.exceptions.HTTPError, OSError) as err:  # API server unreachable: retry later
            raise ApiError(method, path, 0, str(err)) from err
        if 200 <= status < 300 or status in ok:
            return status
        raise ApiError(method, path, status, data.decode("utf-8", "replace"))

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create obj in its namespace; False when it already exists (409)."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta["namespace"])
        status = await self.request("POST", path, obj, query=[("fieldManager", constants.FIELD_MANAGER)], ok=(409,))
        return status != 409

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (dependents go through the garbage collector); False on 404."""
        path = resource_path(api_version, kind, namespace, name)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        return await self.request("DELETE", path, body, ok=(404,)) != 404

    async def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch the job's status subresource; False when the job is gone (404)."""
        path = resource_path(constants.API_VERSION, constants.KIND, namespace, name, "status")
        status = await self.request("PATCH", path, {"status": patch}, content_type="application/merge-patch+json",
                                    query=[("fieldManager", constants.FIELD_MANAGER)], ok=(404,))
        return status != 404

    async def post_event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an Event on the job; a failure to record is logged, never fails the pass."""
        event = event_body(job, type_, reason, message, datetime.now(UTC))
        try:
            await self.create(event)
        except (ApiError, OSError) as err:
            log.warning("could not record event %s on %s: %s", reason, job["metadata"]["name"], err)

    async def fetch_text(self, url: str, timeout: float = 1.0) -> str | None:
        """GET a plain-text endpoint (a trainer's /metrics); None on any failure."""
        def get() -> str | None:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (pod IP URL)
                    return response.read(1_000_000).decode("utf-8", "replace")
            except (OSError, urllib.error.URLError, ValueError):
                return None
        return await asyncio.get_running_loop().run_in_executor(self.pool, get)

