"""One level-based reconcile per job: a work queue fed by job and child-pod events.

kopf's handlers (handlers.py) only keep the indexes current and enqueue the job key. Workers take a
key, read the latest job, pods and support objects from the indexes, ask the pure planner what to do,
execute the actions and write the status once. A key is never processed by two workers at once, and
the events that arrive meanwhile collapse into one more pass. Timers and daemons are not used on
jobs because kopf would put a finalizer on every job for them: owner references do the cleanup.

Under API faults (docs/install.md "Under API faults"): a pass's events and metrics follow the status
write that records its transition, never the attempt; the status a write returned is trusted until the
watch delivers it; a resync after every kopf listing and every `resync_seconds` compares the caches with a
fresh LIST (kopf's indexes never drop what was deleted while a watch was away); a job whose status write
answers 404 is forgotten; a Retry-After holds the job's key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rlhf_contract import wire

from rlhf_operator import api, chain, constants, planner
from rlhf_operator.builders import BuildSettings
from rlhf_operator.kube.executor import HTTP_UNPROCESSABLE, ApiError, KubeApi, event_name, status_merge_patch
from rlhf_operator.kube.observe import (
    CHILD_KINDS,
    JobKey,
    SpecCache,
    child_ref,
    is_live,
    of_another_incarnation,
    owning_job,
    progress_url,
    uid_of,
    vanished,
)
from rlhf_operator.kube.workqueue import THROTTLED, WorkQueue, retry_delay
from rlhf_operator.metrics import OperatorMetrics
from rlhf_operator.progress import merge_progress, parse_progress

log = logging.getLogger(__name__)


class ChildRefused(Exception):
    """The API server refused a child as invalid (422): the job fails instead of retrying the create. The
    message is the API server's, which names the object (`Service "7b-dpo" is invalid: metadata.name: ...`)."""

    def __init__(self, api_message: str):
        super().__init__(f"the API server refused a child of the job: {api_message}")

# A create we sent is trusted for this long while its watch event is on the way, so a pass that runs
# before the event does not POST the same object again (it would get a 409: harmless but wasted).
CREATE_EXPECTATION_SECONDS = 10.0
# Statuses of a write the API server refused for what it is (admission, RBAC, validation), not for
# its load: the pass is still retried, and the job gets one Warning event per streak of refusals so
# that `kubectl describe` shows why its pods do not appear (as the Job controller's FailedCreate).
REFUSED = (400, 403, 422)
# An Event whose POST failed is tried again by the next passes, this many times in all.
EVENT_ATTEMPTS = 5
EVENT_RETRY_SECONDS = 2.0
# After kopf lists a resource again (at startup, or after a watch answered 410 Gone), the resync waits
# until no listing event came for this long, so that one resync follows the whole listing.
RELIST_SETTLE_SECONDS = 1.0


def arrival_completes(expected: dict[tuple[str, str], float], ref: tuple[str, str], now: float) -> bool:
    """A child we created was seen: forget its expectation. True when nothing else we created is still on
    its way (expired expectations do not count), i.e. when the job is due its next pass."""
    expected.pop(ref, None)
    return not any(now - t <= CREATE_EXPECTATION_SECONDS for t in expected.values())


def resource_version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def latest(index: Mapping[Any, Any], key: Any) -> list[dict[str, Any]]:
    """The values a kopf index holds for key (a kopf Store), as a list; [] when none."""
    try:
        return list(index[key])
    except KeyError:
        return []


@dataclass
class JobRecord:
    """What the controller remembers about one job between passes. forget() drops it whole when the job
    is deleted; a pass still running then writes into the dropped record, never into a new one."""

    body: dict[str, Any] | None = None  # the latest body, from the job's own watch events
    specs: SpecCache = field(default_factory=SpecCache)  # the spec parsed per (uid, generation)
    failures: int = 0  # passes that failed in a row (error backoff)
    # (resourceVersion our last status write returned, the status it stored): trusted over the job's cached
    # status until the watch delivers that version (or kopf lists the job again): the cache lags our writes,
    # and the MODIFIED event of an earlier write of ours must not make a pass plan from an older status.
    written: tuple[str, dict[str, Any]] | None = None
    # Children created by the last passes and not seen yet: (kind, name) -> monotonic time of the create.
    expected: dict[tuple[str, str], float] = field(default_factory=dict)
    invalid_generation: int | None = None  # generation already reported invalid
    # The spec the children were built from; a later edit of an immutable field is refused. (The
    # CRD's CEL rules refuse it first on a real API server; this covers servers without CEL.)
    accepted_spec: dict[str, Any] | None = None
    refused_generation: int | None = None  # generation whose immutable change was already reported
    # A status a pass decided but could not write (the write failed): the next pass plans from it, so that
    # what its actions did (a restart) is not decided again, and writes it again.
    unsaved: dict[str, Any] | None = None
    planned_generation: int | None = None  # generation of the last pass that planned
    # Events of transitions not posted yet: those of a pass whose status write failed (posted once a later
    # write records the transition), and those whose POST failed (tried again under the same name).
    pending: list[PendingEvent] = field(default_factory=list)
    # uids of children the caches still hold but the last fresh LIST showed gone (deleted while a watch was
    # away: kopf's indexes drop an object only on its DELETED event, which a re-list after 410 never sends).
    gone: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PendingEvent:
    """A planner event waiting to be posted: `name` is given (event_name) once a status write recorded its
    transition; `attempts` counts the POSTs that failed."""

    event: planner.EmitEvent
    name: str = ""
    attempts: int = 0


@dataclass
class _Writes:
    """One pass's actions, staged by type: API writes run concurrently, then events, then the job delete."""

    writes: list[Awaitable[Any]] = field(default_factory=list)
    events: list[planner.EmitEvent] = field(default_factory=list)
    delete_job: bool = False


@dataclass
class Controller:
    """The operator's state: API, settings, metrics, kopf's indexes, the work queue's workers, and one
    JobRecord per job."""

    api: KubeApi
    settings: BuildSettings
    metrics: OperatorMetrics
    pods: Mapping[JobKey, Any]  # kopf index: (namespace, job) -> child pod bodies
    children: Mapping[JobKey, Any]  # kopf index: (namespace, job) -> support objects (service, ...)
    progress_interval: float = 15.0  # re-read a running job's progress at least this often
    workers: int = 16
    # Seconds between resyncs: every job is listed again with its children and reconciled (as
    # controller-runtime's SyncPeriod), so that what a watch missed is found within this interval.
    resync_seconds: float = 60.0
    fetch_text: Callable[[str], Awaitable[str | None]] | None = None
    queue: WorkQueue = field(default_factory=WorkQueue)
    records: dict[JobKey, JobRecord] = field(default_factory=dict)
    chained: set[JobKey] = field(default_factory=set)  # jobs whose spec names other jobs in fromJob
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _relisting: asyncio.Event | None = field(default=None, init=False, repr=False)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._relisting = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(), name=f"reconcile-{i}") for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="resync"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def enqueue(self, key: JobKey) -> None:
        self.queue.add(key)

    def record(self, key: JobKey) -> JobRecord:
        """The job's record, created on first use."""
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = JobRecord()
        return record

    def job_changed(self, key: JobKey, obj: dict[str, Any], event_type: str | None) -> None:
        """Reconcile a job that changed; but not for a change of its status or metadata alone (our own status
        write, mostly) while that pass's creates are on their way: the pass on their arrival reads it."""
        record = self.record(key)
        old, record.body = record.body, obj
        if record.written and (event_type is None or record.written[0] == resource_version(obj)
                               or record.written[1] == (obj.get("status") or {})):
            record.written = None  # the cache caught up with our last write (or kopf listed the job again)
        sources = self._sources(record)
        if sources:
            self.chained.add(key)
        else:
            self.chained.discard(key)
        if old is None or (old.get("status") or {}).get("phase") != (obj.get("status") or {}).get("phase"):
            self._wake_related(key, sources)
        generation = int((obj.get("metadata") or {}).get("generation") or 1)
        if (event_type == "MODIFIED" and record.expected and is_live(obj)
                and record.planned_generation == generation):
            return
        self.enqueue(key)

    def child_changed(self, key: JobKey, obj: dict[str, Any], event_type: str | None) -> None:
        """Reconcile the job of a child that changed; but a child we just created only counts once all of
        that pass's creates have arrived (as the ReplicaSet controller's expectations): one pass then sees
        the whole gang, instead of one pass and one status write per arriving child."""
        record = self.records.get(key)
        expected = record.expected if record else None
        if (event_type in ("ADDED", None) and expected and child_ref(obj) in expected
                and not arrival_completes(expected, child_ref(obj), time.monotonic())):
            return
        self.enqueue(key)

    def forget(self, key: JobKey) -> None:
        """The job is gone: drop its per-job metrics and everything remembered about it, and tell the jobs
        chained to it (a dependant that has not started now waits for it as "not found")."""
        record = self.records.get(key)
        self.chained.discard(key)
        if record is not None:
            sources = self._sources(record)
            record.body = None
            self._wake_related(key, sources)
        self.queue.forget(key)
        self.records.pop(key, None)
        self.metrics.forget_job(*key)

    # -- jobs chained by fromJob (rlhf_operator.chain) -----------------------------------------------
    @staticmethod
    def _sources(record: JobRecord) -> tuple[str, ...]:
        """The jobs a job's spec names in fromJob; () without a body or with a spec that does not parse."""
        if record.body is None:
            return ()
        try:
            return record.specs.spec_of(record.body).from_jobs()
        except api.SpecError:
            return ()

    def _wake_related(self, key: JobKey, sources: tuple[str, ...]) -> None:
        """A job appeared, changed phase or went: reconcile the jobs that name it (they wait for it, or fail
        with it) and the jobs it names (a finished source's TTL waits for its unfinished dependants)."""
        namespace, name = key
        related = {(namespace, s) for s in sources} | {
            other for other in self.chained
            if other[0] == namespace and other != key and name in self._sources(self.records[other])}
        for other in related:
            if other in self.records and self.records[other].body is not None:
                self.enqueue(other)

    def peers_of(self, key: JobKey, job: api.Job) -> dict[str, chain.PeerJob]:
        """What a pass over `job` needs of the other jobs of its namespace (chain.related_peers): nothing
        unless the job names jobs in fromJob, or is a finished job whose TTL may wait for its dependants."""
        finished_with_ttl = job.status.get("phase") in api.FINISHED_PHASES and job.spec.ttl_seconds_after_finished
        if not job.spec.from_jobs() and not finished_with_ttl:
            return {}
        every = {}
        for other, record in list(self.records.items()):
            if other[0] != key[0] or other == key or record.body is None or not is_live(record.body):
                continue
            try:
                spec = record.specs.spec_of(record.body)
            except api.SpecError:
                spec = None
            meta = record.body.get("metadata") or {}
            status = record.unsaved if record.unsaved is not None else self._status_seen(record, record.body)
            every[other[1]] = chain.peer_of(other[1], meta.get("uid", ""), spec, status)
        return chain.related_peers(key[1], job.spec.from_jobs(), every)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            record = self.records.get(key) or JobRecord()  # a forgotten job's pass writes nowhere
            delay: float | None = None
            try:
                delay = await self.reconcile(key)
                record.failures = 0
            except ApiError as err:
                record.failures += 1
                delay = retry_delay(record.failures, err.status, err.retry_after, random.random())
                log.warning("reconcile %s/%s: %s; retrying in %.1fs", *key, err, delay)
                if err.status in THROTTLED and err.retry_after is not None:
                    self.queue.hold(key, delay)  # no pass before then, whatever events come
                    delay = None
                if err.status in REFUSED and record.failures == 1 and record.body is not None:
                    await self.api.post_recurring_event(record.body, "Warning", "RequestRefused", str(err))
            except Exception:  # a bug must not kill the worker: log it and retry later
                record.failures += 1
                delay = retry_delay(record.failures, 0, None, random.random())
                log.exception("reconcile %s/%s failed; retrying in %.1fs", *key, delay)
            finally:
                self.queue.done(key)
            if delay is not None:
                self.queue.add_after(key, max(0.0, delay))

    # -- resync: the caches against a fresh LIST ----------------------------------------------------
    def relisted(self) -> None:
        """kopf is listing a resource (at startup, or after a watch answered 410 Gone, when whatever was
        deleted meanwhile sends no DELETED event): resync once the listing settles."""
        if self._relisting is not None:
            self._relisting.set()

    async def _resync_loop(self) -> None:
        assert self._relisting is not None
        while True:
            try:
                await asyncio.wait_for(self._relisting.wait(), timeout=self.resync_seconds)
            except TimeoutError:
                pass
            while self._relisting.is_set():  # let the listing's events arrive first
                self._relisting.clear()
                await asyncio.sleep(RELIST_SETTLE_SECONDS)
            try:
                await self.resync()
            except Exception:  # a failed resync is tried again at the next one
                log.exception("resync failed")

    async def resync(self) -> None:
        """List every namespace's jobs and their children afresh: forget the jobs the LIST lacks (deleted
        while the watch was away), mark the children it lacks as gone in their job's record, and reconcile
        every job (a level-based pass against what exists now, as controller-runtime's periodic resync)."""
        for namespace in sorted({key[0] for key in self.records}):
            try:
                await self._resync_namespace(namespace)
            except ApiError as err:
                log.warning("resync of namespace %s: %s; trying again in %.0fs", namespace, err, self.resync_seconds)

    async def _resync_namespace(self, namespace: str) -> None:
        # What the caches hold, taken BEFORE the LISTs: an object missing from a LIST sent after it was cached
        # was deleted; one created after this snapshot is never taken for gone.
        before = {key: (uid_of(record.body), [*latest(self.pods, key), *latest(self.children, key)])
                  for key, record in list(self.records.items()) if key[0] == namespace and record.body is not None}
        jobs = await self.api.list_objects(constants.API_VERSION, constants.KIND, namespace)
        listed_jobs = {(j.get("metadata") or {}).get("name", ""): uid_of(j) for j in jobs or []}
        listed: dict[JobKey, list[dict[str, Any]]] = {}
        kinds = set()
        for api_version, kind in CHILD_KINDS:
            objects = await self.api.list_objects(api_version, kind, namespace, wire.LABEL_JOB)
            if objects is None:  # the kind is not served here (its CRD is not installed)
                continue
            kinds.add((api_version, kind))
            for obj in objects:
                listed.setdefault(owning_job(obj) or ("", ""), []).append(obj)
        for key, (uid, cached) in before.items():
            record = self.records.get(key)
            if record is None or record.body is None or uid_of(record.body) != uid:
                continue  # forgotten or replaced meanwhile: its own events tell the rest
            if jobs is not None and listed_jobs.get(key[1]) != uid:
                log.info("job %s/%s is gone (a fresh LIST lacks it): forgetting it", *key)
                self.forget(key)
                continue
            gone = vanished(cached, listed.get(key, []), kinds)
            if gone - record.gone:
                log.info("job %s/%s: %d children deleted while a watch was away", *key, len(gone - record.gone))
            record.gone = gone
            self.enqueue(key)

    # -- one pass ---------------------------------------------------------------------------------
    async def reconcile(self, key: JobKey) -> float | None:
        """Observe, plan, act, write status. Returns seconds until the next pass is due, or None."""
        record = self.records.get(key)
        raw = record.body if record else None
        if record is None or raw is None or not is_live(raw):
            return None
        started = time.perf_counter()
        now = datetime.now(UTC)
        stored = self._status_seen(record, raw)
        old_status = dict(record.unsaved) if record.unsaved is not None else stored
        accepted = await self._refuse_immutable_changes(record, raw)
        spec = self._valid_spec(record, raw) if accepted is raw else None  # a refused edit: parsed below
        raw = accepted
        try:
            job = api.parse_job({**raw, "status": old_status}, spec)
        except api.SpecError as err:
            await self._report_invalid(key, record, raw, old_status, err, now)
            return None
        record.invalid_generation = None
        if record.accepted_spec is None:
            record.accepted_spec = raw.get("spec") or {}
        record.planned_generation = job.generation

        pods = [p for p in latest(self.pods, key) if self._current_child(record, raw, p)]
        existing = frozenset(child_ref(c) for c in latest(self.children, key)
                             if is_live(c) and self._current_child(record, raw, c))
        scraped = await self._scrape_progress(pods)
        observed = planner.Observed(
            pods=tuple(planner.observe_pod(p) for p in pods),
            existing=existing,
            progress=merge_progress(old_status.get("progress"), scraped, wire.format_time(now)),
            peers=self.peers_of(key, job),
        )
        result = planner.plan(job, observed, now, self.settings)
        log.debug("pass %s/%s: %d pods, %d children -> %s, phase %s", *key, len(pods), len(existing),
                  [type(a).__name__ for a in result.actions], result.status.get("phase"))
        try:
            staged = await self._execute(key, record, result.actions, pods, existing)
        except ChildRefused as refused:
            await self._report_refused_child(key, record, raw, old_status, refused, now)
            return 0.0  # the next pass deletes what the failed job still holds
        new_status = dict(result.status)
        events = [*record.pending, *(PendingEvent(e) for e in staged.events)]
        transition = resource_version(raw)
        if new_status != stored:
            patch = status_merge_patch(stored, new_status)
            try:
                stored_job = await self.api.patch_job_status(key[0], key[1], patch)
            except ApiError as err:
                # Retried by the worker from the status decided here; its events wait for that write.
                record.unsaved, record.pending = new_status, events
                if record.failures == 0:  # once per streak, one Event counting them: why status is stale
                    await self.api.post_recurring_event(raw, "Warning", "StatusWriteFailed", str(err))
                raise
            if stored_job is None:  # a 404 naming the job: deleted, maybe while a watch was away
                log.info("job %s/%s is gone (its status write answered 404): forgetting it", *key)
                self.forget(key)
                return None
            transition = self._wrote(record, stored_job, new_status)
        record.unsaved = None
        # Counted and posted once per transition, after the write that records it: from the status known
        # to be stored (`stored`, not a status whose write failed) to the one just written.
        self.metrics.record_status(key[0], key[1], stored, new_status,
                                   (raw.get("metadata") or {}).get("creationTimestamp"), now)
        record.pending = await self._post_events(raw, events, transition)
        if staged.delete_job:
            await self.api.delete(raw["apiVersion"], raw["kind"], key[0], key[1])
        self.metrics.reconcile.observe(time.perf_counter() - started)
        delay = result.requeue_after
        if record.pending:
            delay = EVENT_RETRY_SECONDS if delay is None else min(delay, EVENT_RETRY_SECONDS)
        if record.expected:  # creates on their way: a pass is due when they expire, at the latest
            delay = CREATE_EXPECTATION_SECONDS if delay is None else min(delay, CREATE_EXPECTATION_SECONDS)
        if new_status.get("phase") == "Running":
            delay = self.progress_interval if delay is None else min(delay, self.progress_interval)
        return delay

    @staticmethod
    def _current_child(record: JobRecord, raw: dict[str, Any], obj: dict[str, Any]) -> bool:
        """A cached child that is this job's and still exists: not seen gone by a resync, not left over from
        an earlier job of the same name."""
        meta = raw.get("metadata") or {}
        return uid_of(obj) not in record.gone and not of_another_incarnation(obj, meta.get("name", ""), uid_of(raw))

    @staticmethod
    def _valid_spec(record: JobRecord, raw: dict[str, Any]) -> api.JobSpec | None:
        """The cached parse of the job's spec; None when it is invalid (parse_job then names every bad
        field, the metadata's too)."""
        try:
            return record.specs.spec_of(raw)
        except api.SpecError:
            return None

    @staticmethod
    def _status_seen(record: JobRecord, raw: dict[str, Any]) -> dict[str, Any]:
        """The status we wrote last while the cache has not delivered that write (job_changed drops it
        then), else the job's cached status."""
        if record.written:
            return dict(record.written[1])
        return dict(raw.get("status") or {})

    @staticmethod
    def _wrote(record: JobRecord, stored_job: dict[str, Any], status: dict[str, Any]) -> str:
        """Remember a status write by what the API server returned (its resourceVersion and status, else
        the status sent); returns that resourceVersion."""
        rv = resource_version(stored_job)
        stored_status = stored_job.get("status")
        record.written = (rv, dict(stored_status) if isinstance(stored_status, dict) else dict(status))
        if record.body is not None and resource_version(record.body) == rv:
            record.written = None  # its watch event came before the answer: the cache holds it already
        return rv

    async def _post_events(self, raw: dict[str, Any], events: list[PendingEvent],
                           transition: str) -> list[PendingEvent]:
        """Post the events of a recorded transition, each under a name of its own (event_name), so a POST
        tried again after a failure cannot record it twice; returns those to try again."""
        left = []
        name = (raw.get("metadata") or {}).get("name", "")
        for pending in events:
            e = pending.event
            named = pending.name or event_name(name, transition, e.type, e.reason, e.message)
            if await self.api.post_event(raw, e.type, e.reason, e.message, named):
                continue
            if pending.attempts + 1 < EVENT_ATTEMPTS:
                left.append(PendingEvent(e, named, pending.attempts + 1))
            else:
                log.warning("job %s: giving up the event %s after %d attempts", name, e.reason, EVENT_ATTEMPTS)
        return left

    async def _refuse_immutable_changes(self, record: JobRecord, raw: dict[str, Any]) -> dict[str, Any]:
        """The job to reconcile: with the accepted spec when an edit changed an immutable field
        (one Warning event per offending generation), else as it is."""
        accepted = record.accepted_spec
        if accepted is None:
            return raw
        changes = api.immutable_changes(accepted, raw.get("spec") or {})
        if not changes:
            record.accepted_spec = raw.get("spec") or {}
            return raw
        generation = int((raw.get("metadata") or {}).get("generation") or 1)
        if record.refused_generation != generation:
            record.refused_generation = generation
            message = "; ".join(f"spec.{path}: {msg}" for path, msg in changes)
            await self.api.post_event(raw, "Warning", "ImmutableFieldChanged",
                                      f"{message}; still running the spec of the job as created")
            log.warning("job %s: refused an immutable change: %s", (raw.get("metadata") or {}).get("name"), message)
        return {**raw, "spec": accepted}

    async def _report_invalid(self, key: JobKey, record: JobRecord, raw: dict[str, Any], old_status: dict[str, Any],
                              err: api.SpecError, now: datetime) -> None:
        """A bad spec: Failed/InvalidSpec status naming the fields, one Warning event, no retries."""
        generation = int((raw.get("metadata") or {}).get("generation") or 1)
        if record.invalid_generation == generation:
            return
        status = planner.invalid_spec_status(old_status, generation, str(err), now)
        if status != old_status:
            stored_job = await self.api.patch_job_status(key[0], key[1], status_merge_patch(old_status, status))
            if stored_job is None:
                self.forget(key)
                return
            self._wrote(record, stored_job, dict(status))
            await self.api.post_event(raw, "Warning", "InvalidSpec", str(err))
        self.metrics.record_status(key[0], key[1], old_status, dict(status),
                                   (raw.get("metadata") or {}).get("creationTimestamp"), now)
        record.invalid_generation = generation
        log.warning("job %s/%s has an invalid spec: %s", *key, err)

    async def _report_refused_child(self, key: JobKey, record: JobRecord, raw: dict[str, Any],
                                    old_status: dict[str, Any], refused: ChildRefused, now: datetime) -> None:
        """A child the API server refused: Failed/ChildRejected with the API's message, one Warning event."""
        generation = int((raw.get("metadata") or {}).get("generation") or 1)
        status = planner.child_rejected_status(old_status, generation, str(refused), now)
        stored_job = await self.api.patch_job_status(key[0], key[1], status_merge_patch(old_status, status))
        if stored_job is None:
            self.forget(key)
            return
        self._wrote(record, stored_job, dict(status))
        await self.api.post_event(raw, "Warning", planner.REASON_CHILD_REJECTED, str(refused))
        self.metrics.record_status(key[0], key[1], old_status, dict(status),
                                   (raw.get("metadata") or {}).get("creationTimestamp"), now)
        log.warning("job %s/%s failed: %s", *key, refused)

    async def _scrape_progress(self, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        url = progress_url(pods, self.settings.trainer_metrics_port)
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

    async def _execute(self, key: JobKey, record: JobRecord, actions: tuple,
                       pods: list[dict[str, Any]], existing: frozenset[tuple[str, str]]) -> _Writes:
        """Creates and deletes run concurrently. Returns what was staged: its events are posted and the job
        deleted by the pass once the status write succeeded."""
        seen = existing | {("Pod", (p.get("metadata") or {}).get("name", "")) for p in pods}
        clock = time.monotonic()
        expected = record.expected
        for ref in [r for r, t in expected.items() if r in seen or clock - t > CREATE_EXPECTATION_SECONDS]:
            del expected[ref]
        staged = _Writes()
        for action in actions:
            self._stage(action, staged, record, key[0], clock)
        results = await asyncio.gather(*staged.writes, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            record.expected = {}  # what failed must be retried for real
            refused = [e for e in errors if isinstance(e, ApiError) and e.status == HTTP_UNPROCESSABLE]
            if refused:  # sending the same object again cannot succeed
                raise ChildRefused(refused[0].api_message) from refused[0]
            raise errors[0]
        return staged

    # -- one method per planner action type ---------------------------------------------------------
    @functools.singledispatchmethod
    def _stage(self, action: object, staged: _Writes, record: JobRecord, namespace: str, clock: float) -> None:
        raise TypeError(f"unknown planner action {action!r}")

    @_stage.register
    def _(self, action: planner.CreateObject, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        ref = child_ref(action.obj)
        if ref not in record.expected:
            record.expected[ref] = clock
            staged.writes.append(self.api.create(action.obj))

    @_stage.register
    def _(self, action: planner.DeletePods, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        for name in action.names:
            record.expected.pop(("Pod", name), None)
            staged.writes.append(self.api.delete("v1", "Pod", namespace, name))

    @_stage.register
    def _(self, action: planner.DeleteObject, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        record.expected.pop((action.kind, action.name), None)
        staged.writes.append(self.api.delete(action.api_version, action.kind, namespace, action.name))

    @_stage.register
    def _(self, action: planner.UpdateObject, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        staged.writes.append(self.api.update(action.obj))

    @_stage.register
    def _(self, action: planner.AnnotatePods, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        for name in action.names:
            staged.writes.append(self.api.annotate("v1", "Pod", namespace, name, dict(action.annotations)))

    @_stage.register
    def _(self, action: planner.AddOwner, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        staged.writes.append(self.api.add_owner("v1", action.kind, namespace, action.name, dict(action.owner)))

    @_stage.register
    def _(self, action: planner.EmitEvent, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        staged.events.append(action)

    @_stage.register
    def _(self, action: planner.DeleteJob, staged: _Writes, record: JobRecord, namespace: str,
          clock: float) -> None:
        staged.delete_job = True
