"""What a reconcile pass sees: pure functions over the raw objects kopf's indexes hold."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from rlhf_contract import wire

from rlhf_operator import api, constants

JobKey = tuple[str, str]  # (namespace, job name)

# (apiVersion, kind) of every child kind a job may have, as handlers.py indexes them by the job label.
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "Pod"), ("v1", "Service"), ("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim"),
    ("scheduling.volcano.sh/v1beta1", "PodGroup"), ("scheduling.x-k8s.io/v1alpha1", "PodGroup"),
)


def uid_of(obj: dict[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("uid") or "")


def of_another_incarnation(obj: dict[str, Any], job_name: str, job_uid: str) -> bool:
    """True when an RLHFJob owner reference of `obj` names the job but another uid: a child of an earlier job
    of the same name (deleted, maybe while a watch was away, and created again), not of this one."""
    if not job_uid:
        return False
    return any(ref.get("kind") == constants.KIND and ref.get("name") == job_name and ref.get("uid") != job_uid
               for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def vanished(cached: Iterable[dict[str, Any]], listed: Iterable[dict[str, Any]],
             listed_kinds: Collection[tuple[str, str]]) -> frozenset[str]:
    """uids of the objects a cache held before a fresh LIST that the LIST lacks: deleted meanwhile. Only
    the (apiVersion, kind)s that were listed count (`listed_kinds`: a kind whose LIST was not served proves
    nothing); objects are told apart by uid, since a gang restart re-creates pods under the same names."""
    present = {uid_of(o) for o in listed}
    return frozenset(uid for o in cached
                     if (o.get("apiVersion"), o.get("kind")) in listed_kinds
                     and (uid := uid_of(o)) and uid not in present)


def owning_job(obj: dict[str, Any]) -> JobKey | None:
    """The job a child belongs to: its job label, else an RLHFJob owner reference; None for strangers."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or ""
    job = (meta.get("labels") or {}).get(wire.LABEL_JOB)
    if job:
        return namespace, job
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == constants.KIND and str(ref.get("apiVersion", "")).startswith(constants.GROUP + "/"):
            return namespace, ref.get("name", "")
    return None


def child_ref(obj: dict[str, Any]) -> tuple[str, str]:
    """(kind, name) of a non-pod child, as the planner's Observed.existing holds them."""
    return obj.get("kind", ""), (obj.get("metadata") or {}).get("name", "")


def is_live(obj: dict[str, Any]) -> bool:
    """False once deletion began: a terminating child is as good as gone for planning creates."""
    return not (obj.get("metadata") or {}).get("deletionTimestamp")


def progress_url(pods: list[dict[str, Any]], port: int) -> str | None:
    """http://POD_IP:PORT/metrics of the running actor rank-0 pod, or None when there is none."""
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        status = pod.get("status") or {}
        if (labels.get(wire.LABEL_ROLE) == "actor" and str(labels.get(wire.LABEL_ROLE_INDEX)) == "0"
                and status.get("phase") == "Running" and status.get("podIP") and is_live(pod)):
            host = status["podIP"]
            host = f"[{host}]" if ":" in host else host
            return f"http://{host}:{port}/metrics"
    return None


class SpecCache:
    """One job's parsed spec, valid for the (uid, generation) it was parsed at: the API server bumps the
    generation on every change of the spec, and most events of a job are status writes."""

    def __init__(self) -> None:
        self._parsed: tuple[tuple[str, int], api.JobSpec] | None = None

    def spec_of(self, obj: dict[str, Any]) -> api.JobSpec:
        """The job's parsed spec; api.SpecError (never cached) when it is invalid."""
        meta = obj.get("metadata") or {}
        stamp = (str(meta.get("uid") or ""), int(meta.get("generation") or 1))
        if self._parsed is not None and self._parsed[0] == stamp:
            return self._parsed[1]
        spec = api.parse_spec(obj.get("spec"))
        self._parsed = (stamp, spec)
        return spec
