"""The reconcile decision for one RLHFJob: plan(job, observed children, now) -> actions + new status.

Pure: no API client, no clock, no globals. The kopf shell and the local runner observe the job's
children, call plan(), execute the actions in order, then write `Plan.status` once and wake up again
after `Plan.requeue_after` seconds (or on the next child event).

The life of a job:

    Pending --gang created--> Creating --all pods Running--> Running --actor pods exit 0--> Succeeded
                                 |  gang timeout                 |  a pod failed or vanished
                                 v                               v
                             Restarting <------------------------+   (after backoff, and once
                                 |                                    the old pods are gone,
                                 +--new gang--> Creating               a new gang is created)
    any --spec.suspend--> Suspended --resume--> Pending
    Failed: PermanentError (exit 65/78), ReachedMaxRestarts, ReachedMaxDisruptions, ReachedMaxGangTimeouts,
            DeadlineExceeded, InvalidSpec, ChildRejected,
            SourceFailed / SourceMismatch / SourceCycle (a `fromJob` source: rlhf_operator.chain)

A job that names other jobs in `fromJob` stays Pending, creating nothing, until they Succeeded.
A gang restart is a failure restart (counted in `restarts`, bounded by maxRestarts) unless a pod of the
gang was disrupted: evicted, preempted, lost with its node, or deleted by someone else. Such a restart
counts in `disruptions` (bounded by maxDisruptions), as JobSet and Kubeflow Trainer keep the two apart.
Every new gang gets the next `attempt` (RLHF_RESTART_ATTEMPT), whatever the cause.

Timing state lives in conditions (`lastTransitionTime` of Created/Restarting), which the CRD's
status schema keeps; `gangCreatedTime`, `gangTimeouts` and `runningTime` are written for people
and metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rlhf_contract import wire
from rlhf_contract.wire import (
    LABEL_RESTART_ATTEMPT,
    LABEL_ROLE,
    LABEL_ROLE_INDEX,
    PERMANENT_EXIT_CODES,
)

from rlhf_operator import chain
from rlhf_operator.api import CONDITION_TYPES, FINISHED_PHASES, Job
from rlhf_operator.builders import (
    BuildSettings,
    build_config_map,
    build_gang,
    build_pod_group,
    build_support_objects,
    co_owner_reference,
    gang_pod_names,
    host_role,
    pod_name,
    rollout_hash,
    support_object_refs,
    uses_kueue_pod_group,
)
from rlhf_operator.constants import (
    ANNOTATION_KUEUE_RETRIABLE,
    MAX_BACKOFF_SECONDS,
)

# A pod created moments ago may not be in the shell's cache yet: missing pods count as vanished
# (a gang failure) only this long after the gang was created.
MISSING_POD_GRACE_SECONDS = 30.0
# The peers of a pod that failed often fail a moment later because it went away (the bridge
# closed), and may be seen first. Wait this long after the first failure for the rest of the gang
# to stop, so that a permanent exit code (bad config or data) that lands last still decides.
FAILURE_SETTLE_SECONDS = 10.0
# How much of a termination message goes into status and events (the kubelet keeps up to 4 KiB).
MAX_MESSAGE_CHARS = 512
# Container waiting reasons of a pod on its way up (not worth a word).
NORMAL_WAITING_REASONS = frozenset({"ContainerCreating", "PodInitializing"})
# Why a pod may never start (issue 18, part 7): the kubelet's container waiting reasons for an image it
# cannot pull or a container it cannot create, and the scheduler's PodScheduled reason. The gang timeout
# still decides (a registry or a node may come back); these are reported in status and events meanwhile.
CANNOT_START_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                                  "CreateContainerConfigError", "CreateContainerError", "Unschedulable"})
# Pod-level reasons (status.reason) of a pod the node or the cluster took away: the kubelet's eviction
# under node pressure, preemption, a node shutdown. Newer clusters also set the DisruptionTarget condition.
DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "NodeLost", "NodeShutdown", "Shutdown", "Terminated",
                                "UnexpectedAdmissionError"})
# A pod held by a scheduling gate (Kueue holds a workload's pods until it is admitted) waits in a queue:
# that wait is not a gang timeout.
GATED_REASON = "SchedulingGated"


# --- observation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedPod:
    """What the planner needs of one child pod."""

    name: str
    role: str
    index: int
    attempt: int  # -1 when the label is missing or garbled: such a pod is stale and gets deleted
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    terminating: bool = False
    created_at: datetime | None = None
    finished_at: datetime | None = None  # the container's terminated.finishedAt
    not_retriable: bool = False  # carries Kueue's retriable-in-group: "false"
    # Why a disruption (not the trainer) ended the pod: its DisruptionTarget condition's reason, or a
    # pod-level reason of DISRUPTION_REASONS ("" when none).
    disruption: str = ""
    # Why a pod that is not running yet waits: a container's waiting reason (ErrImagePull...) or the
    # scheduler's (PodScheduled False: Unschedulable, SchedulingGated), with the kubelet's message.
    waiting_reason: str = ""
    waiting_message: str = ""

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class Observed:
    """Everything the shell saw of the job's children in this pass."""

    pods: tuple[ObservedPod, ...] = ()
    existing: frozenset[tuple[str, str]] = frozenset()  # (kind, name) of non-pod children present
    progress: dict | None = None  # trainer progress scraped by the shell, copied into status.progress
    # Other RLHFJobs of the namespace by name: at least the jobs this one names in fromJob (transitively)
    # and the jobs naming it (chain.related_peers); empty when no job of the namespace uses fromJob.
    peers: Mapping[str, chain.PeerJob] = field(default_factory=dict)


def _int_label(labels: dict[str, str], key: str) -> int:
    try:
        return int(labels.get(key, ""))
    except ValueError:
        return -1


def observe_pod(pod: dict) -> ObservedPod:
    """A pod object (API dict) -> ObservedPod: labels, phase, the trainer's termination state."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    # A failed init container (the source initializer) ends the pod before the trainer starts: its exit
    # code and message stand for the pod's (init containers that succeeded also read terminated, code 0).
    failed_init = next((t for s in status.get("initContainerStatuses") or []
                        if (t := (s.get("state") or {}).get("terminated")) and t.get("exitCode")), None)
    terminated = failed_init or next(
        ((s.get("state") or {}).get("terminated") for s in statuses if (s.get("state") or {}).get("terminated")),
        None,
    ) or {}
    exit_code = terminated.get("exitCode")
    waiting_reason, waiting_message = _waiting(status)
    target = next((c for c in status.get("conditions") or [] if c.get("type") == "DisruptionTarget"
                   and c.get("status") == "True"), None)
    disruption = (target.get("reason") or "DisruptionTarget") if target else (
        status.get("reason") if status.get("reason") in DISRUPTION_REASONS else "")
    return ObservedPod(
        name=meta.get("name", ""),
        role=labels.get(LABEL_ROLE, ""),
        index=_int_label(labels, LABEL_ROLE_INDEX),
        attempt=_int_label(labels, LABEL_RESTART_ATTEMPT),
        phase=status.get("phase") or "Pending",
        exit_code=int(exit_code) if exit_code is not None else None,
        # An evicted pod has no container state, only a pod-level reason and message.
        reason=terminated.get("reason") or status.get("reason") or "",
        message=(terminated.get("message") or status.get("message") or (target or {}).get("message") or "").strip(),
        disruption=disruption,
        terminating=bool(meta.get("deletionTimestamp")),
        created_at=parse_time(meta.get("creationTimestamp")),
        finished_at=parse_time(terminated.get("finishedAt")),
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        not_retriable=(meta.get("annotations") or {}).get(ANNOTATION_KUEUE_RETRIABLE) == "false",
    )


def _waiting(status: dict) -> tuple[str, str]:
    """(reason, message) of the first container (init containers first) waiting with a reason other than
    the normal ones, else of a PodScheduled=False condition; ("", "") otherwise."""
    for container in (*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in NORMAL_WAITING_REASONS:
            return waiting["reason"], (waiting.get("message") or "").strip()
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("reason") or "Unschedulable", (cond.get("message") or "").strip()
    return "", ""


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateObject:
    obj: dict


@dataclass(frozen=True)
class DeletePods:
    names: tuple[str, ...]


@dataclass(frozen=True)
class DeleteObject:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class DeleteJob:
    pass


@dataclass(frozen=True)
class UpdateObject:
    """Write `obj` over the existing object of its kind and name (a merge patch of the whole body)."""

    obj: dict


@dataclass(frozen=True)
class AnnotatePods:
    """Merge these annotations into the pods' metadata (a pod that is gone is skipped)."""

    names: tuple[str, ...]
    annotations: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class AddOwner:
    """Add `owner` (this job, not as controller) to the owners of a claim another job owns: the garbage
    collector deletes an object only once all its owners are gone (a source's volume, chain.Gate.protect)."""

    kind: str
    name: str
    owner: tuple[tuple[str, Any], ...]  # the owner reference's items (hashable, as every action)


@dataclass(frozen=True)
class EmitEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    actions: tuple
    status: dict  # the complete new .status
    requeue_after: float | None  # seconds until a time-based decision is due; None = wait for events


# --- small pure helpers ----------------------------------------------------------------------


def gang_attempt(status: dict) -> int:
    """The attempt number of the status's current gang (see _Pass.attempt)."""
    return int(status.get("attempt", status.get("restarts")) or 0)


def format_time(moment: datetime) -> str:
    return wire.format_time(_utc(moment))


def parse_time(text: str | None) -> datetime | None:
    """RFC3339 -> aware UTC datetime; None for a missing or unreadable value."""
    if not text:
        return None
    try:
        return _utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def backoff_seconds(base: float, attempt: int) -> float:
    """Wait before gang attempt `attempt` (1 = first retry): base, 2*base, 4*base... capped."""
    if attempt < 1:
        return 0.0
    return float(min(base * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))


def get_condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def condition_is_true(status: dict, type_: str) -> bool:
    return (get_condition(status, type_) or {}).get("status") == "True"


def set_condition(status: dict, type_: str, value: bool, reason: str, message: str, now: datetime) -> None:
    """Set a condition; lastTransitionTime changes only when its status flips. ValueError for a type
    outside CONDITION_TYPES (the CRD's enum)."""
    if type_ not in CONDITION_TYPES:
        raise ValueError(f"condition type {type_!r} is not one of the CRD's {CONDITION_TYPES}")
    new_status = "True" if value else "False"
    conditions = status.setdefault("conditions", [])
    current = get_condition(status, type_)
    since = current.get("lastTransitionTime") if current and current.get("status") == new_status else None
    entry = {"type": type_, "status": new_status, "reason": reason, "message": message,
             "lastTransitionTime": since or format_time(now)}
    if current is None:
        conditions.append(entry)
    else:
        conditions[conditions.index(current)] = entry


def gang_created_at(status: dict) -> datetime | None:
    """When the current gang was created; None when no gang is up (not created yet, or torn down)."""
    created = get_condition(status, "Created")
    if not created or created.get("status") != "True":
        return None
    return parse_time(created.get("lastTransitionTime"))


def gang_not_before(status: dict, backoff_base: float) -> datetime | None:
    """Earliest time the next gang may be created: after the backoff of a restart or gang timeout."""
    restarting = get_condition(status, "Restarting")
    if not restarting or restarting.get("status") != "True":
        return None
    since = parse_time(restarting.get("lastTransitionTime"))
    if since is None:
        return None
    if restarting.get("reason") == "GangTimeout":
        attempt = max(1, int(status.get("gangTimeouts") or 0))
    elif restarting.get("reason") == REASON_SPEC_CHANGED:
        return since  # an edit is no failure: the new gang comes as soon as the old pods are gone
    elif restarting.get("reason") == REASON_DISRUPTED:
        attempt = 1  # a disruption is no sign of trouble with the job: the base backoff, not doubled
    else:
        attempt = int(status.get("restarts") or 0)
    return since + timedelta(seconds=backoff_seconds(backoff_base, attempt))


def failure_settle_deadline(failures: list[ObservedPod], pods) -> datetime | None:
    """Until when to wait before classifying a gang failure: pods of the gang still live and the
    first failure less than FAILURE_SETTLE_SECONDS old. None = decide now."""
    finished = [pod.finished_at for pod in failures if pod.finished_at is not None]
    if not finished or all(pod.terminated for pod in pods):
        return None
    return min(finished) + timedelta(seconds=FAILURE_SETTLE_SECONDS)


def describe_failure(pod: ObservedPod) -> str:
    """One line naming the pod, its exit code (or disruption) and its termination message."""
    parts = [f"pod {pod.name} was disrupted ({pod.disruption})" if pod.disruption else f"pod {pod.name} failed"]
    if pod.exit_code is not None:
        parts.append(f"with exit code {pod.exit_code}")
    if pod.reason:
        parts.append(f"({pod.reason})")
    text = " ".join(parts)
    if pod.message:
        text += f": {pod.message[:MAX_MESSAGE_CHARS]}"
    return text


def role_counts(job: Job, pods: list[ObservedPod], creating: tuple[dict, ...] = ()) -> dict[str, dict[str, int]]:
    """status.roles: desired and observed pod counts per role with pods of its own. Pods this pass
    creates count as pending: the status is written after the creates succeed, so it says what the
    next pass observes, and that pass has no status to write (one status write per gang creation)."""
    bucket = {"Pending": "pending", "Unknown": "pending", "Running": "running",
              "Succeeded": "succeeded", "Failed": "failed"}
    counts = {r.name: {"desired": r.replicas, "pending": 0, "running": 0, "succeeded": 0, "failed": 0}
              for r in job.spec.pod_roles()}
    for pod in pods:
        if pod.role in counts:
            counts[pod.role][bucket.get(pod.phase, "pending")] += 1
    for obj in creating:
        role = obj["metadata"]["labels"].get(LABEL_ROLE, "")
        if role in counts:
            counts[role]["pending"] += 1
    return counts


# --- the decision ----------------------------------------------------------------------------


class _Pass:
    """Accumulates one pass's actions, status and wake-up time (private to plan())."""

    def __init__(self, job: Job, observed: Observed, now: datetime, settings: BuildSettings):
        self.job, self.spec, self.observed, self.settings = job, job.spec, observed, settings
        self.now = _utc(now)
        self.status: dict[str, Any] = copy.deepcopy(job.status)
        self.actions: list = []
        self.doomed: set[str] = set()  # pods to delete
        self.requeue_after: float | None = None

    @property
    def phase(self) -> str:
        return self.status["phase"]

    @property
    def attempt(self) -> int:
        """The current gang's attempt (RLHF_RESTART_ATTEMPT): restarts of any cause. Statuses written
        before disruptions were counted apart have no `attempt`: it was `restarts` then."""
        return gang_attempt(self.status)

    def stamp(self) -> str:
        return format_time(self.now)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.actions.append(EmitEvent(type_, reason, message))

    def condition(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        set_condition(self.status, type_, value, reason, message, self.now)

    def clear_condition(self, type_: str, reason: str, message: str = "") -> None:
        """Flip a condition to False if it is True (absent conditions stay absent)."""
        if condition_is_true(self.status, type_):
            self.condition(type_, False, reason, message)

    def delete(self, pods) -> None:
        """Delete pods that are not already on their way out."""
        self.doomed.update(p.name for p in pods if not p.terminating)

    def wake_at(self, moment: datetime) -> None:
        seconds = (moment - self.now).total_seconds()
        if seconds > 0 and (self.requeue_after is None or seconds < self.requeue_after):
            self.requeue_after = seconds

    def result(self) -> Plan:
        actions = list(self.actions)
        if self.doomed:
            actions.insert(0, DeletePods(tuple(sorted(self.doomed))))
        return Plan(tuple(actions), self.status, self.requeue_after)


def _degraded(p: _Pass, before: dict[str, str]) -> None:
    """The trainer's alarms (status.progress.alarms: reason -> message, docs/spec.md "Alarms") -> the
    Degraded condition (True with the first reason while any fires) and one Warning event per reason
    that starts firing; a Normal AlarmsCleared event when the last one stops."""
    alarms = p.status["progress"].get("alarms")
    if alarms is None:
        return
    for reason in alarms:
        if reason not in before:
            p.event("Warning", reason, alarms[reason][:MAX_MESSAGE_CHARS])
    if alarms:
        message = "; ".join(f"{r}: {m}" for r, m in alarms.items())
        p.condition("Degraded", True, next(iter(alarms)), message[:MAX_MESSAGE_CHARS * 2])
    elif condition_is_true(p.status, "Degraded"):
        p.condition("Degraded", False, "AlarmsCleared", "no alarm fires")
        p.event("Normal", "AlarmsCleared", "no alarm fires")


def plan(job: Job, observed: Observed, now: datetime, settings: BuildSettings) -> Plan:
    """The next step for `job` given its observed children; see the module docstring."""
    p = _Pass(job, observed, now, settings)
    p.status.setdefault("phase", "Pending")
    p.status.setdefault("restarts", 0)
    p.status.setdefault("attempt", gang_attempt(p.status))
    p.status["observedGeneration"] = job.generation
    if observed.progress is not None:
        p.status["progress"] = dict(observed.progress)
        _degraded(p, (job.status.get("progress") or {}).get("alarms") or {})

    failed = get_condition(p.status, "Failed")
    if p.phase == "Failed" and failed and (
            failed.get("reason") == "InvalidSpec"
            or (failed.get("reason") == REASON_CHILD_REJECTED and job.generation != job.status.get("observedGeneration"))):
        _reopen_fixed_spec(p)

    if p.phase in FINISHED_PHASES:
        _after_finish(p)
    elif job.spec.suspend:
        _suspend(p)
    else:
        if p.phase == "Suspended":
            _resume(p)
        if _sources_ready(p):
            _create_missing_support_objects(p)
            if not _deadline_exceeded(p) and not _roll_out(p):
                _drive_gang(p)

    if p.phase != "Creating":
        p.status.pop("podsNotStarting", None)  # only a gang on its way up has pods that cannot start
    current = [pod for pod in observed.pods if pod.attempt == p.attempt]
    creating = tuple(a.obj for a in p.actions if isinstance(a, CreateObject) and a.obj.get("kind") == "Pod")
    p.status["roles"] = role_counts(job, current, creating)
    return p.result()


# A gang restart caused by a disruption (the Restarting condition's reason).
REASON_DISRUPTED = "Disrupted"
# A gang restart that rolls out a spec edit (the Restarting condition's reason and the event's).
REASON_SPEC_CHANGED = "SpecChanged"
# Failed because the API server refused a child the builders made (422): the job's message says which.
REASON_CHILD_REJECTED = "ChildRejected"


def child_rejected_status(job_status: dict, generation: int, message: str, now: datetime) -> dict:
    """The status of a job one of whose children the API server refused as invalid: Failed with the API's
    message. An edit of the spec (a new generation) tries again, as after InvalidSpec."""
    status = copy.deepcopy(job_status)
    status.update(phase="Failed", observedGeneration=generation, completionTime=format_time(now))
    status.pop("gangCreatedTime", None)
    set_condition(status, "Failed", True, REASON_CHILD_REJECTED, message[:MAX_MESSAGE_CHARS * 2], now)
    for type_ in ("Running", "Restarting"):
        if condition_is_true(status, type_):
            set_condition(status, type_, False, REASON_CHILD_REJECTED, message[:MAX_MESSAGE_CHARS], now)
    return status


def invalid_spec_status(job_status: dict, generation: int, message: str, now: datetime) -> dict:
    """The status of a job whose spec does not parse: Failed / InvalidSpec naming the bad fields."""
    status = copy.deepcopy(job_status)
    status["phase"] = "Failed"
    status["observedGeneration"] = generation
    set_condition(status, "Failed", True, "InvalidSpec", message, now)
    return status


def _reopen_fixed_spec(p: _Pass) -> None:
    """The spec parses again after an InvalidSpec failure: start over as a new job."""
    p.status["phase"] = "Pending"
    p.status.pop("completionTime", None)
    p.condition("Failed", False, "SpecFixed", "the spec is valid again")
    for type_ in ("Created", "Running", "Restarting"):
        p.clear_condition(type_, "SpecFixed")
    p.event("Normal", "SpecFixed", "the spec is valid again; starting the job")


def _sources_ready(p: _Pass) -> bool:
    """Apply chain.gate(): wait (Pending, status.waitingFor), fail, or go on with the sources recorded."""
    gate = chain.gate(p.job, p.observed.peers)
    if gate.state == "none":
        return True
    if gate.state == "failed":
        p.status.pop("waitingFor", None)
        p.condition(chain.CONDITION, False, gate.reason, gate.message)
        _finish(p, "Failed", gate.reason, gate.message)
        return False
    if gate.state == "waiting":
        waiting_for = ", ".join(gate.waiting_for)
        if p.status.get("waitingFor") != waiting_for:  # one event per change of what it waits for
            p.event("Normal", gate.reason, gate.message)
        p.status["waitingFor"] = waiting_for
        p.condition(chain.CONDITION, False, gate.reason, gate.message)
        return False
    p.status.pop("waitingFor", None)
    if not condition_is_true(p.status, chain.CONDITION):
        p.status["sources"] = [s.to_status() for s in gate.sources]
        message = chain.ready_message(gate.sources)
        p.condition(chain.CONDITION, True, gate.reason, message)
        p.event("Normal", gate.reason, message)
        owner = tuple(co_owner_reference(p.job).items())
        p.actions.extend(AddOwner("PersistentVolumeClaim", claim, owner) for claim in gate.protect)
    return True


def _create_missing_support_objects(p: _Pass) -> None:
    if set(support_object_refs(p.job, p.settings)) <= p.observed.existing:
        return
    for obj in build_support_objects(p.job, p.settings):
        if (obj["kind"], obj["metadata"]["name"]) not in p.observed.existing:
            p.actions.append(CreateObject(obj))


def _roll_out(p: _Pass) -> bool:
    """A spec edit that changes the trainer config or the pods (status.specHash, builders.rollout_hash):
    update the ConfigMap and restart the gang from the last complete checkpoint (a new attempt, no backoff,
    not counted in restarts); with no gang up, the next gang is built from the edit. Fields that apply in
    place (suspend, failurePolicy, deadlines, gangTimeoutSeconds) change no hash. True when this pass
    rolled out (the new gang comes in a later pass, after the ConfigMap write)."""
    if p.job.generation == p.job.status.get("observedGeneration") and "specHash" in p.status:
        return False  # the digest is only recomputed for a new generation
    current, before = rollout_hash(p.job, p.settings), p.status.get("specHash")
    p.status["specHash"] = current
    if before is None or before == current:
        return False  # a new job (or one from before digests): nothing to roll out
    config = build_config_map(p.job)
    if ("ConfigMap", config["metadata"]["name"]) in p.observed.existing:
        p.actions.append(UpdateObject(config))
    if gang_created_at(p.status) is None:
        p.event("Normal", REASON_SPEC_CHANGED, f"spec generation {p.job.generation}: the trainer config is "
                                               f"updated and the next gang is built from it")
        p.wake_at(p.now + timedelta(seconds=1))  # after the ConfigMap write, whatever event comes
        return True
    p.delete(p.observed.pods)
    message = (f"spec generation {p.job.generation} changed the trainer config or the pods: restarting the gang "
               f"from the last complete checkpoint (not counted in restarts)")
    p.status.update(phase="Restarting", attempt=p.attempt + 1, lastRestartTime=p.stamp())
    p.status.pop("gangCreatedTime", None)
    p.condition("Restarting", True, REASON_SPEC_CHANGED, message)
    p.clear_condition("Created", REASON_SPEC_CHANGED, message)
    p.clear_condition("Running", REASON_SPEC_CHANGED, message)
    p.event("Normal", REASON_SPEC_CHANGED, message)
    return True


def _deadline_exceeded(p: _Pass) -> bool:
    """activeDeadlineSeconds, counted from startTime (reset on resume, like a Kubernetes Job)."""
    deadline = p.spec.active_deadline_seconds
    started = parse_time(p.status.get("startTime"))
    if deadline <= 0 or started is None:
        return False
    due = started + timedelta(seconds=deadline)
    if p.now < due:
        p.wake_at(due)
        return False
    _finish(p, "Failed", "DeadlineExceeded",
            f"the job ran longer than activeDeadlineSeconds ({deadline}s) since {p.status['startTime']}")
    return True


def _suspend(p: _Pass) -> None:
    p.delete(p.observed.pods)
    _release_pod_group(p)  # a Volcano PodGroup keeps its minResources reserved while it exists
    if p.phase == "Suspended":
        return
    p.status["phase"] = "Suspended"
    p.status.pop("gangCreatedTime", None)
    p.condition("Suspended", True, "Suspended", "spec.suspend is true: pods deleted")
    for type_ in ("Created", "Running", "Restarting"):
        p.clear_condition(type_, "Suspended")
    p.event("Normal", "Suspended", f"deleting {len(p.doomed)} pods; checkpoints and config are kept")


def _resume(p: _Pass) -> None:
    p.status["phase"] = "Pending"
    # Like a Kubernetes Job, the activeDeadlineSeconds clock starts again on resume.
    p.status.pop("startTime", None)
    p.condition("Suspended", False, "Resumed", "spec.suspend is false")
    p.event("Normal", "Resumed", "creating a new gang; the trainer resumes from the last complete checkpoint")


def _drive_gang(p: _Pass) -> None:
    names = gang_pod_names(p.job)
    current = {pod.name: pod for pod in p.observed.pods
               if pod.attempt == p.attempt and pod.name in names and not pod.terminating}
    # Pods of an older attempt (or no longer in the layout) are never part of the gang.
    p.delete(pod for pod in p.observed.pods if pod.name not in current)
    created_at = gang_created_at(p.status)
    if created_at is not None and _actors_succeeded(p, current):
        return
    if _failed_permanently(p, current):
        return
    if created_at is None:
        _start_gang(p, names, current)
    else:
        _watch_gang(p, names, current, created_at)


def permanent_failures(pods: Iterable[ObservedPod], attempt: int) -> list[ObservedPod]:
    """The pods whose exit decides that gang attempt `attempt` failed for good: a pod of this attempt
    or of the one before it (the gang whose failure started this attempt) that terminated with a
    permanent exit code, terminating or not, first to finish first.

    Every pod's exit counts, however late it comes: a peer deleted in a gang restart may still exit 65/78
    in its grace period, after the restart was decided; until the new gang exists, that exit turns the
    restart into a permanent failure (issue 18, part 6).
    """
    late = datetime.max.replace(tzinfo=UTC)
    return sorted((pod for pod in pods
                   if pod.attempt in (attempt, attempt - 1) and pod.terminated
                   and pod.exit_code in PERMANENT_EXIT_CODES),
                  key=lambda pod: (pod.finished_at or late, pod.name))


def _actors_succeeded(p: _Pass, current: dict[str, ObservedPod]) -> bool:
    """Every actor pod exited 0: the job is done (a peer that failed as the actor left does not count)."""
    actor_host = p.spec.role(host_role(p.spec, "actor"))
    actor_pods = [pod_name(p.job.name, actor_host.name, i) for i in range(actor_host.replicas)]
    if not all(n in current and current[n].phase == "Succeeded" for n in actor_pods):
        return False
    _finish(p, "Succeeded", "Succeeded", f"all {len(actor_pods)} actor pods exited 0")
    return True


def _failed_permanently(p: _Pass, current: dict[str, ObservedPod]) -> bool:
    """A permanent exit code among the gang's pods: Failed/PermanentError, whatever else failed first
    and whether or not a restart was already decided."""
    permanent = permanent_failures(p.observed.pods, p.attempt)
    if not permanent:
        return False
    # The running gang's failures have not been reported yet; a late permanent exit neither.
    reported = {pod.name: pod for pod in current.values() if pod.phase == "Failed"}
    reported.update((pod.name, pod) for pod in permanent if pod.name not in reported)
    for name in sorted(reported):
        p.event("Warning", "PodFailed", describe_failure(reported[name]))
    message = f"{describe_failure(permanent[0])} (permanent error: not restarting)"
    if p.phase == "Restarting":
        message += "; the pending gang restart is cancelled"
    _finish(p, "Failed", "PermanentError", message)
    return True


def _start_gang(p: _Pass, names: list[str], current: dict[str, ObservedPod]) -> None:
    """Create the whole gang at once, after any backoff and once no old pod holds one of its names."""
    finished = [pod for pod in current.values() if pod.terminated]
    p.delete(finished)
    holders = {pod.name for pod in p.observed.pods if pod.name in names and pod.name not in current}
    if finished or holders:
        return  # the pods' deletion events wake the shell
    not_before = gang_not_before(p.status, p.spec.failure_policy.backoff_seconds)
    if not_before is not None and p.now < not_before:
        p.wake_at(not_before)
        return
    pod_group = ("PodGroup", p.job.name)
    if pod_group in support_object_refs(p.job, p.settings) and pod_group not in p.observed.existing:
        # A pod created before its PodGroup is scheduled alone (coscheduling) or held by a group that
        # does not exist (Volcano): the gang waits for its PodGroup's creation event.
        return
    # Pods of this attempt that already exist come from an interrupted pass: keep them.
    sources = {s.name: s.claim for s in chain.recorded_sources(p.status)}
    missing = [pod for pod in build_gang(p.job, p.attempt, p.settings, sources)
               if pod["metadata"]["name"] not in current]
    p.actions.extend(CreateObject(pod) for pod in missing)
    stamp = p.stamp()
    p.status["phase"] = "Creating"
    p.status["gangCreatedTime"] = stamp
    p.status.setdefault("startTime", stamp)
    message = f"created {len(missing)} of {len(names)} pods of gang attempt {p.attempt}"
    p.condition("Created", True, "GangCreated", message)
    p.clear_condition("Restarting", "GangCreated", message)
    p.event("Normal", "GangCreated", message)
    p.wake_at(p.now + timedelta(seconds=p.spec.scheduling.gang_timeout_seconds))


def _watch_gang(p: _Pass, names: list[str], current: dict[str, ObservedPod], created_at: datetime) -> None:
    failures = sorted((pod for pod in current.values() if pod.phase == "Failed"), key=lambda pod: pod.name)
    settle_until = failure_settle_deadline(failures, current.values())
    if settle_until is not None and p.now < settle_until:
        p.wake_at(settle_until)
        return

    missing = [n for n in names if n not in current]
    grace_end = created_at + timedelta(seconds=MISSING_POD_GRACE_SECONDS)
    if failures or (missing and p.now >= grace_end):
        _gang_failed(p, failures, missing)
        return
    if missing:
        p.wake_at(grace_end)

    started = not missing and all(pod.phase in ("Running", "Succeeded") for pod in current.values())
    if started and p.phase != "Running":
        stamp = p.stamp()
        p.status["phase"] = "Running"
        p.status.setdefault("runningTime", stamp)
        message = f"all {len(names)} pods of gang attempt {p.attempt} are running"
        p.condition("Running", True, "GangRunning", message)
        p.event("Normal", "Running", message)
    elif not started and p.phase != "Running":
        waiting = [pod for pod in current.values() if pod.phase not in ("Running", "Succeeded")]
        _report_blocked(p, waiting)
        timeout = p.spec.scheduling.gang_timeout_seconds
        timeout_at = created_at + timedelta(seconds=timeout)
        if p.now < timeout_at:
            p.wake_at(timeout_at)
        elif waiting and all(pod.waiting_reason == GATED_REASON for pod in waiting):
            # Waiting for admission (Kueue): look again one gang timeout later.
            p.wake_at(p.now + timedelta(seconds=timeout))
        else:
            _gang_timeout(p, names, current, timeout)


def blocked_pods(pods: Iterable[ObservedPod]) -> list[ObservedPod]:
    """Pods that wait for a reason that may never go away (CANNOT_START_REASONS), by name."""
    return sorted((pod for pod in pods if pod.waiting_reason in CANNOT_START_REASONS), key=lambda pod: pod.name)


def describe_blocked(pods: list[ObservedPod]) -> str:
    """`pod j-actor-0: ImagePullBackOff: Back-off pulling image "x"; pod ...`, the kubelet's words."""
    parts = [f"pod {pod.name}: {pod.waiting_reason}" + (f": {pod.waiting_message}" if pod.waiting_message else "")
             for pod in pods]
    return "; ".join(parts)[:MAX_MESSAGE_CHARS]


def _blocked_kind(reason: str) -> str:
    """ErrImagePull and ImagePullBackOff alternate while the kubelet retries: one kind, one event."""
    return "ImagePull" if reason in ("ErrImagePull", "ImagePullBackOff") else reason


def _report_blocked(p: _Pass, waiting: list[ObservedPod]) -> None:
    """Pods that cannot start: status.podsNotStarting lists them with the kubelet's reason and message, the
    Running condition (False) says the same; a Warning event when a pod is newly blocked or its kind of block
    changes (not when blocked pods start: that is no news, and the set shrinking back to an earlier one would
    repeat an earlier warning word for word)."""
    blocked = blocked_pods(waiting)
    before = [(entry.get("name"), _blocked_kind(entry.get("reason", ""))) for entry in p.status.get("podsNotStarting") or []]
    if not blocked:
        p.status.pop("podsNotStarting", None)
        return
    p.status["podsNotStarting"] = [{"name": pod.name, "reason": pod.waiting_reason,
                                    "message": pod.waiting_message[:MAX_MESSAGE_CHARS]} for pod in blocked]
    message = describe_blocked(blocked)
    p.condition("Running", False, blocked[0].waiting_reason, message)
    if {(pod.name, _blocked_kind(pod.waiting_reason)) for pod in blocked} - set(before):
        p.event("Warning", "PodsCannotStart", message)


def _gang_failed(p: _Pass, failures: list[ObservedPod], missing: list[str]) -> None:
    """A pod failed or vanished: restart the whole gang, or give up after maxRestarts (maxDisruptions when a
    pod was disrupted: its peers' failures that follow are the disruption's, not the job's)."""
    for pod in failures:
        p.event("Warning", "PodFailed", describe_failure(pod))
    if missing:
        p.event("Warning", "PodFailed", f"deleted before the job finished: {', '.join(missing)}")
    disrupted = [pod for pod in failures if pod.disruption]
    policy = p.spec.failure_policy
    if disrupted or missing:
        cause = describe_failure(disrupted[0]) if disrupted else f"pod {missing[0]} was deleted"
        done, limit, counter, reason = int(p.status.get("disruptions") or 0), policy.max_disruptions, "disruptions", \
            REASON_DISRUPTED
        if done >= limit:
            _finish(p, "Failed", "ReachedMaxDisruptions",
                    f"the gang was disrupted after {done} disruptions (maxDisruptions {limit}): {cause}")
            return
    else:
        cause = describe_failure(failures[0])
        done, limit, counter, reason = int(p.status.get("restarts") or 0), policy.max_restarts, "restarts", "PodFailed"
        if done >= limit:
            _finish(p, "Failed", "ReachedMaxRestarts",
                    f"the gang failed after {done} restarts (maxRestarts {limit}): {cause}")
            return
    p.delete(p.observed.pods)
    wait = backoff_seconds(policy.backoff_seconds, 1 if reason == REASON_DISRUPTED else done + 1)
    p.status.update({"phase": "Restarting", counter: done + 1, "attempt": p.attempt + 1,
                     "lastRestartTime": p.stamp()})
    p.status.pop("gangCreatedTime", None)
    if reason == REASON_DISRUPTED:
        message = f"disruption {done + 1} of {limit} (not counted in maxRestarts), new gang in {wait:g}s: {cause}"
    else:
        message = f"restart {done + 1} of {limit} in {wait:g}s: {cause}"
    p.condition("Restarting", True, reason, message)
    p.clear_condition("Created", "GangRestart", message)
    p.clear_condition("Running", "GangRestart", message)
    p.event("Warning", "GangDisrupted" if reason == REASON_DISRUPTED else "GangRestart", message)
    p.wake_at(p.now + timedelta(seconds=wait))


def _gang_timeout(p: _Pass, names: list[str], current: dict[str, ObservedPod], timeout: int) -> None:
    """Not every pod was Running within gangTimeoutSeconds: free the nodes and try again later, or fail
    once failurePolicy.maxGangTimeouts timeouts were retried."""
    timeouts = int(p.status.get("gangTimeouts") or 0) + 1
    waiting = sorted(n for n in names if n not in current or current[n].phase not in ("Running", "Succeeded"))
    blocked = blocked_pods(current.values())
    why = f": {describe_blocked(blocked)}" if blocked else ""
    p.status["gangTimeouts"] = timeouts
    limit = p.spec.failure_policy.max_gang_timeouts
    if timeouts > limit:
        _finish(p, "Failed", "ReachedMaxGangTimeouts",
                f"{len(waiting)} of {len(names)} pods not running within {timeout}s for the {_ordinal(timeouts)} "
                f"time (maxGangTimeouts {limit}){why}")
        return
    p.delete(p.observed.pods)
    wait = backoff_seconds(p.spec.failure_policy.backoff_seconds, timeouts)
    p.status["phase"] = "Restarting"
    p.status.pop("gangCreatedTime", None)
    message = (f"{len(waiting)} of {len(names)} pods not running within {timeout}s "
               f"({', '.join(waiting)}); recreating the gang in {wait:g}s (gang timeout {timeouts} of {limit}){why}")
    p.condition("Restarting", True, "GangTimeout", message)
    p.clear_condition("Created", "GangTimeout", message)
    p.event("Warning", "GangTimeout", message)
    p.wake_at(p.now + timedelta(seconds=wait))


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _finish(p: _Pass, phase: str, reason: str, message: str) -> None:
    p.status["phase"] = phase
    p.status["completionTime"] = p.stamp()
    p.status.pop("gangCreatedTime", None)
    p.condition(phase, True, reason, message)
    p.clear_condition("Running", reason, message)
    p.clear_condition("Restarting", reason, message)
    if phase == "Succeeded":
        p.event("Normal", "Succeeded", message)
    else:
        p.event("Warning", "DeadlineExceeded" if reason == "DeadlineExceeded" else "Failed", message)
    p.requeue_after = None  # the running job's wake-ups (its deadline, a gang timeout) no longer apply
    _after_finish(p)


def _release_pod_group(p: _Pass) -> None:
    """Delete the gang scheduler's PodGroup if it exists (resume and a new gang recreate it)."""
    pod_group = build_pod_group(p.job, p.settings)
    if pod_group and ("PodGroup", pod_group["metadata"]["name"]) in p.observed.existing:
        p.actions.append(DeleteObject(pod_group["apiVersion"], "PodGroup", pod_group["metadata"]["name"]))


def _give_back_kueue_quota(p: _Pass) -> bool:
    """A failed job's Kueue pod group holds its quota while Kueue waits for replacement pods: mark the pods
    not retriable first (retriable-in-group: "false"). True while marks are on their way; the pods are
    deleted in the pass that sees them marked (the writes of one pass run concurrently)."""
    if p.phase != "Failed" or not uses_kueue_pod_group(p.job, p.settings):
        return False
    unmarked = sorted(pod.name for pod in p.observed.pods if not pod.not_retriable and not pod.terminating)
    if unmarked:
        p.actions.append(AnnotatePods(tuple(unmarked), ((ANNOTATION_KUEUE_RETRIABLE, "false"),)))
    return bool(unmarked)


def _after_finish(p: _Pass) -> None:
    """A finished job holds no resources: delete live pods (terminated ones stay for `kubectl
    logs`) and the PodGroup (Volcano reserves its minResources); delete the job after its TTL, but not
    while a job that names it in fromJob is unfinished (that job's pass over its sources wakes this one)."""
    if not _give_back_kueue_quota(p):
        p.delete(pod for pod in p.observed.pods if not pod.terminated)
    _release_pod_group(p)
    ttl = p.spec.ttl_seconds_after_finished
    completed = parse_time(p.status.get("completionTime"))
    if ttl <= 0 or completed is None:
        return
    due = completed + timedelta(seconds=ttl)
    if p.now >= due and chain.dependants(p.job.name, p.observed.peers):
        return
    if p.now >= due:
        p.actions.append(DeleteJob())
        p.event("Normal", "TTLExpired", f"deleting the job {ttl}s after it finished")
    else:
        p.wake_at(due)
