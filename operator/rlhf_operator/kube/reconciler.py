"""One level-based reconcile per job: a work queue fed by job and child-pod events.

kopf's handlers (handlers.py) only keep the indexes current and enqueue the job key. Workers take a
key, read the latest job, pods and support objects from the indexes, ask the pure planner what to do,
execute the actions and write the status once. A key is never processed by two workers at once, and
the events that arrive meanwhile collapse into one more pass. Timers and daemons are not used on
jobs because kopf would put a finalizer on every job for them: owner references do the cleanup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rlhf_operator import api, planner
from rlhf_operator.builders import BuildSettings
from rlhf_operator.kube.executor import HTTP_UNPROCESSABLE, ApiError, KubeApi, status_merge_patch
from rlhf_operator.kube.observe import JobKey, SpecCache, child_ref, is_live, progress_url
from rlhf_operator.kube.workqueue import WorkQueue, error_backoff
from rlhf_operator.metrics import OperatorMetrics
from rlhf_operator.progress import merge_progress, parse_progress

log = logging.getLogger(__name__)


class ChildRefused(Exception):
    """The API server refused a child as invalid (422): the job fails instead of retrying the create."""

    def __init__(self, kind: str, name: str, message: str):
        self.kind, self.name, self.message = kind, name, message
        super().__init__(f"the API server refused {kind} {name}: {message}")

# A create we sent is trusted for this long while its watch event is on the way, so a pass that runs
# before the event does not POST the same object again (it would get a 409: harmless but wasted).
CREATE_EXPECTATION_SECONDS = 10.0


def arrival_completes(expected: dict[tuple[str, str], float], ref: tuple[str, str], now: float) -> bool:
    """A child we created was seen: forget its expectation. True when nothing else we created is still on
    its way (expired expectations do not count), i.e. when the job is due its next pass."""
    expected.pop(ref, None)
    return not any(now - t <= CREATE_EXPECTATION_SECONDS for t in expected.values())


def stamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def latest(index: Mapping[Any, Any], key: Any) -> list[dict[str, Any]]:
    """The values a kopf index holds for key (a kopf Store), as a list; [] when none."""
    try:
        return list(index[key])
    except KeyError:
        return []


@dataclass
class Controller:
    """The operator's state: API, settings, metrics, kopf's indexes, and the work queue's workers."""

    api: KubeApi
    settings: BuildSettings
    metrics: OperatorMetrics
    pods: Mapping[JobKey, Any]  # kopf index: (namespace, job) -> child pod bodies
    children: Mapping[JobKey, Any]  # kopf index: (namespace, job) -> support objects (service, ...)
    trainer_metrics_port: int = 9400
    progress_interval: float = 15.0  # re-read a running job's progress at least this often
    workers: int = 16
    fetch_text: Callable[[str], Awaitable[str | None]] | None = None
    queue: WorkQueue = field(default_factory=WorkQueue)
    # The latest body of every job, from the job's own watch events (job_changed / forget).
    jobs: dict[JobKey, dict[str, Any]] = field(default_factory=dict)
    specs: SpecCache = field(default_factory=SpecCache)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _failures: dict[JobKey, int] = field(default_factory=dict)
    # (resourceVersion the status was patched from, the status written): the index lags our writes.
    _written: dict[JobKey, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    _expected: dict[JobKey, dict[tuple[str, str], float]] = field(default_factory=dict)
    _invalid: dict[JobKey, int] = field(default_factory=dict)  # generation already reported invalid
    # The spec the children were built from; a later edit of an immutable field is refused. (The
    # CRD's CEL rules refuse it first on a real API server; this covers servers without CEL.)
    _accepted: dict[JobKey, dict[str, Any]] = field(default_factory=dict)
    _refused: dict[JobKey, int] = field(default_factory=dict)  # generation already refused
    _planned: dict[JobKey, int] = field(default_factory=dict)  # generation of the last pass that planned

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"reconcile-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def enqueue(self, key: JobKey) -> None:
        self.queue.add(key)

    def job_changed(self, key: JobKey, obj: dict[str, Any], event_type: str | None) -> None:
        """Reconcile a job that changed; but not for a change of its status or metadata alone (our own status
        write, mostly) while that pass's creates are on their way: the pass on their arrival reads it."""
        self.jobs[key] = obj
        generation = int((obj.get("metadata") or {}).get("generation") or 1)
        if (event_type == "MODIFIED" and self._expected.get(key) and is_live(obj)
                and self._planned.get(key) == generation):
            return
        self.enqueue(key)

    def child_changed(self, key: JobKey, obj: dict[str, Any], event_type: str | None) -> None:
        """Reconcile the job of a child that changed; but a child we just created only counts once all of
        that pass's creates have arrived (as the ReplicaSet controller's expectations): one pass then sees
        the whole gang, instead of one pass and one status write per arriving child."""
        expected = self._expected.get(key)
        if (event_type in ("ADDED", None) and expected and child_ref(obj) in expected
                and not arrival_completes(expected, child_ref(obj), time.monotonic())):
            return
        self.enqueue(key)

    def forget(self, key: JobKey) -> None:
        """The job is gone: drop its per-job metrics and everything remembered about it."""
        self.queue.forget(key)
        self.jobs.pop(key, None)
        self.specs.forget(key)
        for memory in (self._failures, self._written, self._expected, self._invalid, self._accepted, self._refused,
                       self._planned):
            memory.pop(key, None)
        self.metrics.forget_job(*key)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            delay: float | None = None
            try:
                delay = await self.reconcile(key)
                self._failures.pop(key, None)
            except ApiError as err:
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                delay = error_backoff(failures)
                log.warning("reconcile %s/%s: %s; retrying in %.1fs", *key, err, delay)
            except Exception:  # a bug must not kill the worker: log it and retry later
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                delay = error_backoff(failures)
                log.exception("reconcile %s/%s failed; retrying in %.1fs", *key, delay)
            finally:
                self.queue.done(key)
            if delay is not None:
                self.queue.add_after(key, max(0.0, delay))

    # -- one pass ---------------------------------------------------------------------------------
    async def reconcile(self, key: JobKey) -> float | None:
        """Observe, plan, act, write status. Returns seconds until the next pass is due, or None."""
        raw = self.jobs.get(key)
        if raw is None or not is_live(raw):
            return None
        started = time.perf_counter()
        now = datetime.now(UTC)
        old_status = self._current_status(key, raw)
        accepted = await self._refuse_immutable_changes(key, raw)
        spec = self._valid_spec(key, raw) if accepted is raw else None  # a refused edit: parsed below
        raw = accepted
        try:
            job = api.parse_job({**raw, "status": old_status}, spec)
        except api.SpecError as err:
            await self._report_invalid(key, raw, old_status, err, now)
            return None
        self._invalid.pop(key, None)
        self._accepted.setdefault(key, raw.get("spec") or {})
        self._planned[key] = job.generation

        pods = latest(self.pods, key)
        existing = frozenset(child_ref(c) for c in latest(self.children, key) if is_live(c))
        scraped = await self._scrape_progress(pods)
        observed = planner.Observed(
            pods=tuple(planner.observe_pod(p) for p in pods),
            existing=existing,
            progress=merge_progress(old_status.get("progress"), scraped, stamp(now)),
        )
        result = planner.plan(job, observed, now, self.settings)
        log.debug("pass %s/%s: %d pods, %d children -> %s, phase %s", *key, len(pods), len(existing),
                  [type(a).__name__ for a in result.actions], result.status.get("phase"))
        try:
            await self._execute(key, raw, result.actions, pods, existing)
        except ChildRefused as refused:
            await self._report_refused_child(key, raw, old_status, refused, now)
            return 0.0  # the next pass deletes what the failed job still holds
        new_status = dict(result.status)
        if new_status != old_status:
            patch = status_merge_patch(old_status, new_status)
            if not await self.api.patch_job_status(key[0], key[1], patch):
                return None  # deleted meanwhile
            self._written[key] = ((raw.get("metadata") or {}).get("resourceVersion", ""), new_status)
        self.metrics.record_status(key[0], key[1], old_status, new_status,
                                   (raw.get("metadata") or {}).get("creationTimestamp"), now)
        self.metrics.reconcile.observe(time.perf_counter() - started)
        delay = result.requeue_after
        if self._expected.get(key):  # creates on their way: a pass is due when they expire, at the latest
            delay = CREATE_EXPECTATION_SECONDS if delay is None else min(delay, CREATE_EXPECTATION_SECONDS)
        if new_status.get("phase") == "Running":
            delay = self.progress_interval if delay is None else min(delay, self.progress_interval)
        return delay

    def _valid_spec(self, key: JobKey, raw: dict[str, Any]) -> api.JobSpec | None:
        """The cached parse of the job's spec; None when it is invalid (parse_job then names every bad
        field, the metadata's too)."""
        try:
            return self.specs.spec_of(key, raw)
        except api.SpecError:
            return None

    def _current_status(self, key: JobKey, raw: dict[str, Any]) -> dict[str, Any]:
        """The job's status, or the one we wrote last if the index has not seen that write yet."""
        written = self._written.get(key)
        rv = (raw.get("metadata") or {}).get("resourceVersion", "")
        if written and written[0] == rv:
            return dict(written[1])
        self._written.pop(key, None)
        return dict(raw.get("status") or {})

    async def _refuse_immutable_changes(self, key: JobKey, raw: dict[str, Any]) -> dict[str, Any]:
        """The job to reconcile: with the accepted spec when an edit changed an immutable field
        (one Warning event per offending generation), else as it is."""
        accepted = self._accepted.get(key)
        if accepted is None:
            return raw
        changes = api.immutable_changes(accepted, raw.get("spec") or {})
        if not changes:
            self._accepted[key] = raw.get("spec") or {}
            return raw
        generation = int((raw.get("metadata") or {}).get("generation") or 1)
        if self._refused.get(key) != generation:
            self._refused[key] = generation
            message = "; ".join(f"spec.{path}: {msg}" for path, msg in changes)
            await self.api.post_event(raw, "Warning", "ImmutableFieldChanged",
                                      f"{message}; still running the spec of the job as created")
            log.warning("job %s/%s: refused an immutable change: %s", *key, message)
        return {**raw, "spec": accepted}

    async def _report_invalid(self, key: JobKey, raw: dict[str, Any], old_status: dict[str, Any],
                              err: api.SpecError, now: datetime) -> None:
        """A bad spec: Failed/InvalidSpec status naming the fields, one Warning event, no retries."""
        generation = int((raw.get("metadata") or {}).get("generation") or 1)
        if self._invalid.get(key) == generation:
            return
        status = planner.invalid_spec_status(old_status, generation, str(err), now)
        if status != old_status:
            await self.api.patch_job_status(key[0], key[1], status_merge_patch(old_status, status))
            self._written[key] = ((raw.get("metadata") or {}).get("resourceVersion", ""), dict(status))
            await self.api.post_event(raw, "Warning", "InvalidSpec", str(err))
        self.metrics.record_status(key[0], key[1], old_status, dict(status),
                                   (raw.get("metadata") or {}).get("creationTimestamp"), now)
        self._invalid[key] = generation
        log.warning("job %s/%s has an invalid spec: %s", *key, err)

    async def _report_refused_child(self, key: JobKey, raw: dict[str, Any], old_status: dict[str, Any],
                                    refused: ChildRefused, now: datetime) -> None:
        """A child the API server refused: Failed/ChildRejected with the API's message, one Warning event."""
        generation = int((raw.get("metadata") or {}).get("generation") or 1)
        status = planner.child_rejected_status(old_status, generation, str(refused), now)
        patch = status_merge_patch(old_status, status)
        if not await self.api.patch_job_status(key[0], key[1], patch):
            return
        self._written[key] = ((raw.get("metadata") or {}).get("resourceVersion", ""), dict(status))
        await self.api.post_event(raw, "Warning", planner.REASON_CHILD_REJECTED, str(refused))
        self.metrics.record_status(key[0], key[1], old_status, dict(status),
                                   (raw.get("metadata") or {}).get("creationTimestamp"), now)
        log.warning("job %s/%s failed: %s", *key, refused)

    async def _create(self, obj: dict[str, Any]) -> bool:
        """Create a child; ChildRefused when the API server finds it invalid (no retry can help)."""
        try:
            return await self.api.create(obj)
        except ApiError as err:
            if err.status != HTTP_UNPROCESSABLE:
                raise
            kind, name = child_ref(obj)
            raise ChildRefused(kind, name, err.api_message) from err

    async def _scrape_progress(self, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        url = progress_url(pods, self.trainer_metrics_port)
        if url is None:
            return None
        fetch = self.fetch_text or self.api.fetch_text
        text = await fetch(url)
        if not text:
            return None
        try:
            return parse_progress(text) or None
        except ValueError as err:
            log.info("ignoring unreadable trainer metrics at %s: %s", url, err)
            return None

    async def _execute(self, key: JobKey, raw: dict[str, Any], actions: tuple, pods: list[dict[str, Any]],
                       existing: frozenset[tuple[str, str]]) -> None:
        """Creates and deletes run concurrently; events follow; deleting the job comes last."""
        namespace = key[0]
        seen = existing | {("Pod", (p.get("metadata") or {}).get("name", "")) for p in pods}
        expected = self._expected.setdefault(key, {})
        clock = time.monotonic()
        for ref in [r for r, t in expected.items() if r in seen or clock - t > CREATE_EXPECTATION_SECONDS]:
            del expected[ref]
        writes: list[Awaitable[Any]] = []
        events: list[Any] = []
        delete_job = False
        for action in actions:
            kind = type(action).__name__
            if kind == "CreateObject":
                ref = child_ref(action.obj)
                if ref not in expected:
                    expected[ref] = clock
                    writes.append(self._create(action.obj))
            elif kind == "DeletePods":
                for name in action.names:
                    expected.pop(("Pod", name), None)
                    writes.append(self.api.delete("v1", "Pod", namespace, name))
            elif kind == "DeleteObject":
                expected.pop((action.kind, action.name), None)
                writes.append(self.api.delete(action.api_version, action.kind, namespace, action.name))
            elif kind == "EmitEvent":
                events.append(action)
            elif kind == "DeleteJob":
                delete_job = True
            else:
                raise TypeError(f"unknown planner action {action!r}")
        results = await asyncio.gather(*writes, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self._expected.pop(key, None)  # what failed must be retried for real
            raise next((e for e in errors if isinstance(e, ChildRefused)), errors[0])
        for event in events:
            await self.api.post_event(raw, event.type, event.reason, event.message)
        if delete_job:
            await self.api.delete(raw["apiVersion"], raw["kind"], namespace, key[1])
