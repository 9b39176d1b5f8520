"""kopf registration only: indexes of the jobs' children, and events that enqueue a job.

The reconcile itself is in reconciler.py. No handler here needs a finalizer (indexes and event
handlers never do), so jobs carry none: their children go with them through owner references.
Run with `rlhf-operator operator` (run.py), or `kopf run -m rlhf_operator.kube.handlers` with defaults.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from rlhf_contract import wire

from rlhf_operator import api, constants
from rlhf_operator.kube.config import OperatorConfig
from rlhf_operator.kube.executor import KubeApi
from rlhf_operator.kube.observe import SpecCache, owning_job
from rlhf_operator.kube.reconciler import Controller
from rlhf_operator.metrics import OperatorMetrics

JOB = (constants.GROUP, constants.VERSION, constants.PLURAL)
CHILD = {"labels": {wire.LABEL_JOB: kopf.PRESENT}}
VOLCANO_PODGROUPS = ("scheduling.volcano.sh", "v1beta1", "podgroups")
COSCHEDULING_PODGROUPS = ("scheduling.x-k8s.io", "v1alpha1", "podgroups")


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, job_pods: kopf.Index,
                job_services: kopf.Index, job_configmaps: kopf.Index, job_pvcs: kopf.Index,
                job_volcano_podgroups: kopf.Index, job_coscheduling_podgroups: kopf.Index, **_: Any) -> None:
    """When the operator starts, connect to the API, serve metrics and start the reconcile workers."""
    config: OperatorConfig = memo.get("config") or OperatorConfig()
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's would repeat it
    settings.peering.standalone = True
    settings.persistence.diffbase_storage = NoDiffBase()
    metrics = OperatorMetrics()
    memo.metrics_server = metrics.serve(config.metrics_port) if config.metrics_port else None
    children = MergedIndex((job_services, job_configmaps, job_pvcs, job_volcano_podgroups,
                            job_coscheduling_podgroups))
    memo.controller = Controller(
        api=KubeApi.connect(config.concurrency), settings=config.build_settings, metrics=metrics,
        pods=job_pods, children=children,
        progress_interval=config.progress_interval, workers=config.workers, resync_seconds=config.resync_seconds)
    memo.controller.start()


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    """When the operator stops, stop the workers, the API session and the metrics server."""
    if memo.get("controller"):
        await memo.controller.stop()
        await memo.controller.api.close()
    if memo.get("metrics_server"):
        memo.metrics_server.shutdown()


@kopf.index("", "v1", "pods", **CHILD, id="job_pods")
@kopf.index("", "v1", "services", **CHILD, id="job_services")
@kopf.index("", "v1", "configmaps", **CHILD, id="job_configmaps")
@kopf.index("", "v1", "persistentvolumeclaims", **CHILD, id="job_pvcs")
@kopf.index(*VOLCANO_PODGROUPS, **CHILD, id="job_volcano_podgroups")
@kopf.index(*COSCHEDULING_PODGROUPS, **CHILD, id="job_coscheduling_podgroups")
async def child_index(body: kopf.Body, **_: Any) -> dict:
    """Index the operator's children of each kind by (namespace, job); kopf names each index by its id."""
    return {owning_job(body): dict(body)}


# Jobs have no kopf index: job_event sees every event of a job (DELETED too) and keeps the controller's
# store of job bodies, so each job event costs one handler call instead of two. (The pod index still
# holds every handler back until the pods are listed at startup, which is what the passes need.)
@kopf.on.event(*JOB)
async def job_event(event: dict, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """When a job is added or changed, reconcile it; when it is deleted, forget it."""
    if event.get("type") is None:  # kopf is listing the jobs: a resync follows (what was deleted sends nothing)
        memo.controller.relisted()
    if event.get("type") == "DELETED":
        memo.controller.forget((namespace, name))
        return
    job = dict(body)
    memo.controller.job_changed((namespace, name), job, event.get("type"))
    check_spec(memo.controller.record((namespace, name)).specs, job)


def check_spec(specs: SpecCache, job: dict[str, Any]) -> None:
    """kopf.PermanentError for a bad spec (the pass writes Failed + an event). The parse is cached per
    generation and shared with the reconcile pass: most events of a job are its own status writes."""
    if (job.get("status") or {}).get("phase") == "Failed":
        return
    try:
        specs.spec_of(job)
    except api.SpecError as err:  # tell kopf not to retry
        raise kopf.PermanentError(str(err)) from err


@kopf.on.event("", "v1", "pods", **CHILD)
@kopf.on.event("", "v1", "services", **CHILD, id="service_event")
@kopf.on.event("", "v1", "configmaps", **CHILD, id="configmap_event")
@kopf.on.event("", "v1", "persistentvolumeclaims", **CHILD, id="pvc_event")
@kopf.on.event(*VOLCANO_PODGROUPS, **CHILD, id="volcano_podgroup_event")
@kopf.on.event(*COSCHEDULING_PODGROUPS, **CHILD, id="coscheduling_podgroup_event")
async def child_event(event: dict, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """When a child pod (or support object) changes or goes, reconcile its job."""
    key = owning_job(body)
    if key and memo.get("controller"):
        if event.get("type") is None:  # kopf is listing this kind (startup, or a watch answered 410 Gone)
            memo.controller.relisted()
        memo.controller.child_changed(key, dict(body), event.get("type"))


class NoDiffBase(kopf.DiffBaseStorage):
    """No "last handled state" of objects. kopf builds one on every watch event (two deep copies of
    the body) for on.create/update/resume handlers and daemons; this module registers none, only
    indexes and event handlers, so the copies were a third of kopf's work per event."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> None:  # type: ignore[override]
        return None

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        pass


class MergedIndex:
    """Read-only union of several kopf indexes with the same keys (one per support-object kind)."""

    def __init__(self, indexes: tuple[Any, ...]):
        self._indexes = indexes

    def __getitem__(self, key: Any) -> list:
        values = [v for index in self._indexes if key in index for v in index[key]]
        if not values:
            raise KeyError(key)
        return values

