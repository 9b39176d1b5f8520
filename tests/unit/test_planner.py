"""planner: (job, observed children, now) -> actions + status, every branch as a named case."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from rlhf_contract.wire import LABEL_RESTART_ATTEMPT
from rlhf_operator import api, builders, planner
from rlhf_operator.api import PHASES, parse_job
from rlhf_operator.builders import BuildSettings
from rlhf_operator.constants import MAX_BACKOFF_SECONDS
from rlhf_operator.planner import (
    CreateObject,
    DeleteJob,
    DeleteObject,
    DeletePods,
    EmitEvent,
    Observed,
    ObservedPod,
)
from rlhfjob_cases import status_schema, to_json_schema

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = BuildSettings()
SUPPORT = frozenset({("Service", "j"), ("ConfigMap", "j-config"), ("PersistentVolumeClaim", "j-checkpoints")})
GANG = ["j-actor-0", "j-critic-0"]


# The CRD's status schema: the API server refuses a status write that breaks it (an enum) and drops
# fields it does not declare, so every planned status must fit it.
STATUS_SCHEMA = jsonschema.Draft7Validator(to_json_schema(status_schema()))


def status_problems(status: dict) -> list[str]:
    return [f"status.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in STATUS_SCHEMA.iter_errors(status)]


def ts(seconds: float = 0) -> str:
    return planner.format_time(T0 + timedelta(seconds=seconds))


def make_job(status=None, roles=None, generation=1, **spec):
    """A rule-reward PPO job `j`: actor + critic pods, reference colocated into the actor."""
    body = {
        "algorithm": "ppo",
        "image": "trainer:1",
        "model": {"path": "tiny://llama"},
        "reward": {"type": "rule", "rule": "exact_match"},
        "dataset": {"path": "synthetic://arithmetic"},
        "roles": copy.deepcopy(roles or [{"name": "actor"}, {"name": "critic"},
                                         {"name": "reference", "colocateWith": "actor"}]),
    }
    body.update(spec)
    obj = {"metadata": {"name": "j", "namespace": "ns", "uid": "uid-j", "generation": generation},
           "spec": body, "status": copy.deepcopy(status or {})}
    return parse_job(obj)


def pod(name: str, phase: str = "Running", attempt: int = 0, exit_code: int | None = None,
        message: str = "", reason: str = "", terminating: bool = False,
        finished: float | None = None, waiting: tuple[str, str] = ("", ""), disruption: str = "") -> ObservedPod:
    _, role, index = name.split("-")
    finished_at = T0 + timedelta(seconds=finished) if finished is not None else None
    return ObservedPod(name=name, role=role, index=int(index), attempt=attempt, phase=phase,
                       exit_code=exit_code, reason=reason, message=message, terminating=terminating,
                       finished_at=finished_at, waiting_reason=waiting[0], waiting_message=waiting[1],
                       disruption=disruption)


def waiting(name: str, reason: str, message: str = "") -> ObservedPod:
    """A Pending pod of attempt 0 whose container (or scheduling) waits for `reason`."""
    return pod(name, "Pending", waiting=(reason, message))


PULL_BACKOFF = 'Back-off pulling image "registry.example/trainer:nope"'
BLOCKED_ACTOR = [{"name": "j-actor-0", "reason": "ErrImagePull", "message": PULL_BACKOFF}]


def running(*names: str, attempt: int = 0) -> tuple[ObservedPod, ...]:
    return tuple(pod(n, attempt=attempt) for n in names)


def status(phase: str = "Pending", restarts: int = 0, created: float | None = None, running_since: float | None = None,
           restarting: tuple[str, float] | None = None, **extra: Any) -> dict:
    """A status as the planner leaves it; times are seconds after T0."""
    st: dict[str, Any] = {"phase": phase, "restarts": restarts, "conditions": []}
    if created is not None:
        st["gangCreatedTime"] = ts(created)
        planner.set_condition(st, "Created", True, "GangCreated", "", T0 + timedelta(seconds=created))
        st.setdefault("startTime", ts(created))
    if running_since is not None:
        planner.set_condition(st, "Running", True, "GangRunning", "", T0 + timedelta(seconds=running_since))
    if restarting is not None:
        reason, at = restarting
        planner.set_condition(st, "Restarting", True, reason, "", T0 + timedelta(seconds=at))
    st.update(extra)
    return st


CREATING = status("Creating", created=0)
RUNNING = status("Running", created=0, running_since=10)
# The digest of the gang make_job() builds: a status whose gang came from the unedited spec.
BUILT = {"specHash": builders.rollout_hash(make_job(), SETTINGS), "observedGeneration": 1}


def created_names(plan) -> list[str]:
    return [a.obj["metadata"]["name"] for a in plan.actions if isinstance(a, CreateObject)]


def deleted_names(plan) -> list[str]:
    return [n for a in plan.actions if isinstance(a, DeletePods) for n in a.names]


def event_reasons(plan) -> list[str]:
    return [a.reason for a in plan.actions if isinstance(a, EmitEvent)]


def condition(plan, type_: str) -> dict | None:
    return planner.get_condition(plan.status, type_)


@dataclass
class Case:
    status: dict
    pods: tuple[ObservedPod, ...] = ()
    at: float = 0  # seconds after T0
    spec: dict = field(default_factory=dict)
    existing: frozenset = SUPPORT
    # expectations; None = not checked
    phase: str | None = None
    creates: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    requeue: float | None = None
    restarts: int | None = None
    cond: tuple[str, str, str] | None = None  # (type, status, reason)
    message_has: tuple[str, ...] = ()  # substrings of the `cond` condition's message
    status_has: dict = field(default_factory=dict)  # status keys and their values (None = absent)
    annotates: list[str] = field(default_factory=list)  # pods marked retriable-in-group: "false"
    updates: list[str] = field(default_factory=list)  # objects rewritten (UpdateObject)
    generation: int = 1


CASES: dict[str, Case] = {
    # --- creating the gang
    "new job: support objects and the whole gang in one pass": Case(
        status={}, existing=frozenset(), phase="Creating",
        creates=["j", "j-config", "j-checkpoints", *GANG], events=["GangCreated"], requeue=300,
        cond=("Created", "True", "GangCreated")),
    "support objects present: only the gang is created": Case(
        status={}, phase="Creating", creates=GANG, events=["GangCreated"], requeue=300),
    "a lost support object is recreated while running": Case(
        status=RUNNING, pods=running(*GANG), at=50, existing=SUPPORT - {("ConfigMap", "j-config")},
        phase="Running", creates=["j-config"]),
    # --- release what holds cluster resources (issue 18, part 8)
    "volcano job: the PodGroup first, the gang once it exists": Case(
        status={}, spec={"scheduling": {"gangScheduler": "volcano"}}, phase="Pending", creates=["j"]),
    "volcano job whose PodGroup exists: the gang is created": Case(
        status={"phase": "Pending"}, spec={"scheduling": {"gangScheduler": "volcano"}},
        existing=SUPPORT | {("PodGroup", "j")}, phase="Creating", creates=GANG, events=["GangCreated"], requeue=300),
    "coscheduling: a lost PodGroup is recreated before any new gang": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 0)),
        spec={"scheduling": {"gangScheduler": "coscheduling"}}, at=60, phase="Restarting", creates=["j"]),
    "suspend deletes the PodGroup too": Case(
        status=RUNNING, spec={"suspend": True, "scheduling": {"gangScheduler": "volcano"}}, pods=running(*GANG),
        existing=SUPPORT | {("PodGroup", "j")}, at=100, phase="Suspended", deletes=GANG, events=["Suspended"]),
    "resume recreates the PodGroup, then the gang": Case(
        status=status("Suspended", startTime=ts(0)), spec={"scheduling": {"gangScheduler": "volcano"}}, at=1000,
        phase="Pending", creates=["j"], events=["Resumed"]),
    "a failed Kueue gang: its pods are marked not retriable before they go": Case(
        status={"phase": "Failed", "completionTime": ts(0)}, spec={"scheduling": {"queue": "team-a"}},
        pods=(pod("j-actor-0", "Failed", exit_code=78), pod("j-critic-0")), at=1, phase="Failed",
        annotates=["j-actor-0", "j-critic-0"]),
    "a failed Kueue gang whose pods are marked: the live ones are deleted": Case(
        status={"phase": "Failed", "completionTime": ts(0)}, spec={"scheduling": {"queue": "team-a"}},
        pods=(dataclasses.replace(pod("j-actor-0", "Failed", exit_code=78), not_retriable=True),
              dataclasses.replace(pod("j-critic-0"), not_retriable=True)), at=2, phase="Failed",
        deletes=["j-critic-0"]),
    "a succeeded Kueue gang is not marked": Case(
        status={"phase": "Succeeded", "completionTime": ts(0)}, spec={"scheduling": {"queue": "team-a"}},
        pods=(pod("j-actor-0", "Succeeded", exit_code=0), pod("j-critic-0")), at=1, phase="Succeeded",
        deletes=["j-critic-0"]),
    "gang timeout setting decides the first wake-up": Case(
        status={}, spec={"scheduling": {"gangTimeoutSeconds": 45}}, phase="Creating",
        creates=GANG, events=["GangCreated"], requeue=45),
    "interrupted creation: only the missing pods are created": Case(
        status={"phase": "Pending"}, pods=(pod("j-actor-0", "Pending"),), phase="Creating",
        creates=["j-critic-0"], events=["GangCreated"], requeue=300),
    "old attempt's pods still terminating: wait for them": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 0), lastRestartTime=ts(0)),
        pods=(pod("j-actor-0", terminating=True), pod("j-critic-0", "Failed", exit_code=1, terminating=True)),
        at=60, phase="Restarting"),
    "old attempt's pod not deleted yet: delete it, create nothing": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 0)),
        pods=(pod("j-actor-0"),), at=60, phase="Restarting", deletes=["j-actor-0"]),
    "a finished pod of the current attempt blocks its name: delete it first": Case(
        status={"phase": "Pending"}, pods=(pod("j-actor-0", "Failed", exit_code=1),),
        phase="Pending", deletes=["j-actor-0"]),
    "backoff pending: wake when it is due": Case(
        status=status("Restarting", restarts=2, restarting=("PodFailed", 0)), at=5,
        phase="Restarting", requeue=15),  # 10 * 2**(2-1) = 20s after the restart
    "backoff over: the new gang carries attempt = restarts": Case(
        status=status("Restarting", restarts=2, restarting=("PodFailed", 0)), at=20,
        phase="Creating", creates=GANG, events=["GangCreated"], requeue=300,
        cond=("Restarting", "False", "GangCreated")),
    "backoff is capped": Case(
        status=status("Restarting", restarts=9, restarting=("PodFailed", 0)),
        spec={"failurePolicy": {"maxRestarts": 20, "backoffSeconds": 100}}, at=10,
        phase="Restarting", requeue=MAX_BACKOFF_SECONDS - 10),
    # --- starting up
    "some pods pending: still Creating, wake at the gang timeout": Case(
        status=CREATING, pods=(pod("j-actor-0"), pod("j-critic-0", "Pending")), at=100,
        phase="Creating", requeue=200),
    "phase Unknown counts as not running": Case(
        status=CREATING, pods=(pod("j-actor-0"), pod("j-critic-0", "Unknown")), at=100,
        phase="Creating", requeue=200),
    "every pod running: Running, announced once": Case(
        status=CREATING, pods=running(*GANG), at=12, phase="Running", events=["Running"],
        cond=("Running", "True", "GangRunning")),
    "already Running: nothing to do": Case(
        status=RUNNING, pods=running(*GANG), at=500, phase="Running"),
    "a fast non-actor pod already done counts as started": Case(
        status=CREATING, pods=(pod("j-actor-0"), pod("j-critic-0", "Succeeded", exit_code=0)), at=12,
        phase="Running", events=["Running"]),
    "gang timeout: delete the pods, retry after backoff without spending a restart": Case(
        status=CREATING, pods=(pod("j-actor-0"), pod("j-critic-0", "Pending")), at=300,
        phase="Restarting", restarts=0, deletes=GANG, events=["GangTimeout"], requeue=10,
        cond=("Restarting", "True", "GangTimeout"), message_has=("j-critic-0", "300s")),
    "after a gang timeout the next gang waits for its own backoff": Case(
        status=status("Restarting", restarting=("GangTimeout", 400), gangTimeouts=2), at=410,
        phase="Restarting", requeue=10),  # 10 * 2**(2-1) = 20s
    "after a gang timeout and its backoff: same attempt again": Case(
        status=status("Restarting", restarting=("GangTimeout", 400), gangTimeouts=2), at=420,
        phase="Creating", creates=GANG, events=["GangCreated"], requeue=300),
    # --- pods that can never start (issue 18, part 7)
    "an image that cannot be pulled: status, Running condition and one event in the kubelet's words": Case(
        status=CREATING, pods=(waiting("j-actor-0", "ImagePullBackOff", PULL_BACKOFF), pod("j-critic-0")), at=100,
        phase="Creating", events=["PodsCannotStart"], requeue=200, cond=("Running", "False", "ImagePullBackOff"),
        message_has=("pod j-actor-0: ImagePullBackOff: Back-off pulling image",),
        status_has={"podsNotStarting": [{"name": "j-actor-0", "reason": "ImagePullBackOff", "message": PULL_BACKOFF}]}),
    "the kubelet alternating ErrImagePull and ImagePullBackOff: no second event": Case(
        status={**CREATING, "podsNotStarting": BLOCKED_ACTOR},
        pods=(waiting("j-actor-0", "ImagePullBackOff", PULL_BACKOFF), pod("j-critic-0")), at=150,
        phase="Creating", events=[], requeue=150),
    "another pod blocked too: a new event": Case(
        status={**CREATING, "podsNotStarting": BLOCKED_ACTOR},
        pods=(waiting("j-actor-0", "ErrImagePull", PULL_BACKOFF),
              waiting("j-critic-0", "CreateContainerConfigError", 'secret "hf-token" not found')), at=150,
        phase="Creating", events=["PodsCannotStart"], requeue=150, cond=("Running", "False", "ErrImagePull"),
        message_has=("j-actor-0", 'j-critic-0: CreateContainerConfigError: secret "hf-token" not found')),
    "a blocked pod starting while another stays blocked: no news, no event": Case(
        status={**CREATING, "podsNotStarting": [*BLOCKED_ACTOR, {"name": "j-critic-0", "reason": "Unschedulable",
                                                                  "message": "0/1 nodes are available"}]},
        pods=(waiting("j-actor-0", "ImagePullBackOff", PULL_BACKOFF), pod("j-critic-0")), at=150,
        phase="Creating", events=[], requeue=150,
        status_has={"podsNotStarting": [{"name": "j-actor-0", "reason": "ImagePullBackOff", "message": PULL_BACKOFF}]}),
    "an invalid image name is reported": Case(
        status=CREATING, pods=(waiting("j-actor-0", "InvalidImageName", 'couldn\'t parse image name "Trainer:1"'),
                               pod("j-critic-0")), at=10,
        phase="Creating", events=["PodsCannotStart"], requeue=290, cond=("Running", "False", "InvalidImageName")),
    "an unschedulable pod is reported with the scheduler's message": Case(
        status=CREATING, pods=(pod("j-actor-0"), waiting("j-critic-0", "Unschedulable",
                                                         "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")),
        at=60, phase="Creating", events=["PodsCannotStart"], requeue=240, cond=("Running", "False", "Unschedulable"),
        message_has=("Insufficient nvidia.com/gpu",)),
    "a container being created is no block": Case(
        status=CREATING, pods=(waiting("j-actor-0", "ContainerCreating"), pod("j-critic-0")), at=10,
        phase="Creating", events=[], requeue=290, status_has={"podsNotStarting": None}),
    "the gang runs at last: the block is cleared": Case(
        status={**CREATING, "podsNotStarting": BLOCKED_ACTOR}, pods=running(*GANG), at=200, phase="Running",
        events=["Running"], cond=("Running", "True", "GangRunning"), status_has={"podsNotStarting": None}),
    "gang timeout of a blocked gang: the kubelet's reason is in the message": Case(
        status={**CREATING, "podsNotStarting": BLOCKED_ACTOR},
        pods=(waiting("j-actor-0", "ImagePullBackOff", PULL_BACKOFF), pod("j-critic-0")), at=300,
        phase="Restarting", deletes=GANG, events=["GangTimeout"], requeue=10,
        cond=("Restarting", "True", "GangTimeout"), message_has=("gang timeout 1 of 5", "ImagePullBackOff"),
        status_has={"gangTimeouts": 1, "podsNotStarting": None}),
    "the gang timeout after maxGangTimeouts fails the job": Case(
        status={**CREATING, "gangTimeouts": 5, "podsNotStarting": BLOCKED_ACTOR},
        pods=(waiting("j-actor-0", "ImagePullBackOff", PULL_BACKOFF), pod("j-critic-0")), at=300,
        phase="Failed", deletes=GANG, events=["Failed"], cond=("Failed", "True", "ReachedMaxGangTimeouts"),
        message_has=("6th time", "maxGangTimeouts 5", "Back-off pulling image"), status_has={"gangTimeouts": 6}),
    "maxGangTimeouts 0: the first gang timeout fails the job": Case(
        status=CREATING, spec={"failurePolicy": {"maxGangTimeouts": 0}},
        pods=(pod("j-actor-0"), waiting("j-critic-0", "Unschedulable", "0/1 nodes are available")), at=300,
        phase="Failed", deletes=GANG, events=["PodsCannotStart", "Failed"],
        cond=("Failed", "True", "ReachedMaxGangTimeouts"), message_has=("1st time",)),
    "pods held by Kueue's scheduling gate wait in the queue: no gang timeout": Case(
        status=CREATING, pods=(waiting("j-actor-0", "SchedulingGated", "Scheduling is blocked due to non-empty "
                                       "scheduling gates"), waiting("j-critic-0", "SchedulingGated")), at=300,
        phase="Creating", events=[], requeue=300, status_has={"gangTimeouts": None}),
    # --- spec edits: rolled out, or applied in place (issue 18, part 3)
    "a hyperparameter edit while running: new config, a new gang from the last checkpoint, no failure": Case(
        status={**RUNNING, **BUILT}, generation=2, spec={"hyperparameters": {"maxSteps": 40}}, pods=running(*GANG),
        at=500, phase="Restarting", deletes=GANG, updates=["j-config"], events=["SpecChanged"], requeue=None,
        cond=("Restarting", "True", "SpecChanged"), message_has=("generation 2", "not counted in restarts"),
        status_has={"restarts": 0, "attempt": 1, "disruptions": None}, restarts=0),
    "a replicas edit (a resize) is rolled out the same way": Case(
        status={**RUNNING, **BUILT}, generation=2, pods=running(*GANG), at=500,
        spec={"roles": [{"name": "actor", "replicas": 2}, {"name": "critic"},
                        {"name": "reference", "colocateWith": "actor"}]},
        phase="Restarting", deletes=GANG, updates=["j-config"], events=["SpecChanged"],
        cond=("Restarting", "True", "SpecChanged")),
    "an image edit changes only the pods: still a rollout": Case(
        status={**RUNNING, **BUILT}, generation=2, spec={"image": "trainer:2"}, pods=running(*GANG), at=500,
        phase="Restarting", deletes=GANG, updates=["j-config"], events=["SpecChanged"]),
    "an edit of a field applied in place (failurePolicy) restarts nothing": Case(
        status={**RUNNING, **BUILT}, generation=2, spec={"failurePolicy": {"maxRestarts": 9}}, pods=running(*GANG),
        at=500, phase="Running", status_has={"specHash": BUILT["specHash"]}),
    "an edit while the gang is down: the config now, the gang next pass": Case(
        status={**status("Restarting", restarts=1, restarting=("PodFailed", 0)), **BUILT}, generation=2,
        spec={"hyperparameters": {"learningRate": 0.5}}, at=60, phase="Restarting", updates=["j-config"], requeue=1,
        events=["SpecChanged"], status_has={"attempt": 1, "restarts": 1}),
    "after a rollout the new gang comes at once (no backoff)": Case(
        status=status("Restarting", restarts=2, restarting=("SpecChanged", 0), attempt=3), at=0.5,
        phase="Creating", creates=GANG, events=["GangCreated"], requeue=300, status_has={"restarts": 2}),
    "an edit of a finished job changes nothing": Case(
        status={"phase": "Succeeded", "completionTime": ts(0), **BUILT}, generation=2,
        spec={"hyperparameters": {"maxSteps": 40}}, at=5, phase="Succeeded"),
    # --- pods that vanish
    "pod missing just after creation (cache lag): wait out the grace": Case(
        status=CREATING, pods=(pod("j-actor-0"),), at=5, phase="Creating",
        requeue=planner.MISSING_POD_GRACE_SECONDS - 5),
    "pod missing after the grace: deleted by someone else, a disruption": Case(
        status=CREATING, pods=(pod("j-actor-0"),), at=planner.MISSING_POD_GRACE_SECONDS,
        phase="Restarting", restarts=0, deletes=["j-actor-0"], events=["PodFailed", "GangDisrupted"], requeue=10,
        cond=("Restarting", "True", "Disrupted"), message_has=("j-critic-0 was deleted", "disruption 1 of 10"),
        status_has={"disruptions": 1, "attempt": 1}),
    "a running pod deleted by someone else: a disruption, not a failure": Case(
        status=RUNNING, pods=(pod("j-actor-0"), pod("j-critic-0", terminating=True)), at=500,
        phase="Restarting", restarts=0, deletes=["j-actor-0"], events=["PodFailed", "GangDisrupted"], requeue=10,
        status_has={"disruptions": 1, "attempt": 1}),
    # --- failures
    "retryable exit code: delete every pod, restart after backoff": Case(
        status=RUNNING, pods=(pod("j-actor-0"), pod("j-critic-0", "Failed", exit_code=1, message="CUDA error")),
        at=500, phase="Restarting", restarts=1, deletes=GANG, events=["PodFailed", "GangRestart"], requeue=10,
        cond=("Restarting", "True", "PodFailed"), message_has=("j-critic-0", "exit code 1", "CUDA error")),
    "OOM kill (137) is retryable": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Failed", exit_code=137, reason="OOMKilled"), pod("j-critic-0")),
        at=500, phase="Restarting", restarts=1, deletes=GANG, message_has=("OOMKilled",),
        cond=("Restarting", "True", "PodFailed"), events=["PodFailed", "GangRestart"], requeue=10),
    # --- disruptions are not failures (issue 18, part 5)
    "an evicted pod: a disruption, restarts untouched": Case(
        status=RUNNING, pods=(pod("j-actor-0"), pod("j-critic-0", "Failed", reason="Evicted", disruption="Evicted",
                                                    message="node low on memory")),
        at=500, phase="Restarting", restarts=0, deletes=GANG, events=["PodFailed", "GangDisrupted"], requeue=10,
        cond=("Restarting", "True", "Disrupted"), message_has=("j-critic-0 was disrupted (Evicted)", "node low"),
        status_has={"disruptions": 1, "attempt": 1, "restarts": 0}),
    "a preempted pod and its peer's failure that followed: one disruption": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Failed", exit_code=1, finished=498),
                              pod("j-critic-0", "Failed", exit_code=143, finished=497,
                                  disruption="PreemptionByScheduler")),
        at=500, phase="Restarting", restarts=0, deletes=GANG, events=["PodFailed", "PodFailed", "GangDisrupted"],
        requeue=10, status_has={"disruptions": 1, "restarts": 0}),
    "a disruption after failures: the base backoff, the failure count kept": Case(
        status=status("Running", restarts=2, created=0, running_since=10, attempt=2),
        pods=(pod("j-actor-0", attempt=2),
              pod("j-critic-0", "Failed", exit_code=143, attempt=2, disruption="DeletionByTaintManager")),
        at=500, phase="Restarting", deletes=GANG, events=["PodFailed", "GangDisrupted"], requeue=10,
        status_has={"disruptions": 1, "restarts": 2, "attempt": 3}),
    "a disruption when maxRestarts is used up still restarts": Case(
        status=status("Running", restarts=3, created=0, running_since=10, attempt=3),
        pods=(pod("j-actor-0", attempt=3), pod("j-critic-0", "Failed", attempt=3, disruption="EvictionByEvictionAPI")),
        at=500, phase="Restarting", deletes=GANG, events=["PodFailed", "GangDisrupted"], requeue=10,
        status_has={"disruptions": 1, "restarts": 3, "attempt": 4}),
    "maxDisruptions reached: Failed": Case(
        status=status("Running", created=0, running_since=10, attempt=2, disruptions=2),
        spec={"failurePolicy": {"maxDisruptions": 2}},
        pods=(pod("j-actor-0", attempt=2), pod("j-critic-0", "Failed", attempt=2, disruption="Evicted")),
        at=500, phase="Failed", deletes=["j-actor-0"], events=["PodFailed", "Failed"],
        cond=("Failed", "True", "ReachedMaxDisruptions"), message_has=("maxDisruptions 2",)),
    "the new gang after a disruption carries the next attempt": Case(
        status=status("Restarting", restarting=("Disrupted", 0), attempt=1, disruptions=1), at=10,
        phase="Creating", creates=GANG, events=["GangCreated"], requeue=300, status_has={"attempt": 1}),
    "a disruption waits the base backoff only": Case(
        status=status("Restarting", restarts=3, restarting=("Disrupted", 0), attempt=5, disruptions=2),
        spec={"failurePolicy": {"maxRestarts": 5}}, at=4, phase="Restarting", requeue=6),
    "a status written before attempts were counted apart: attempt = restarts": Case(
        status=status("Running", restarts=2, created=0, running_since=10),
        pods=running(*GANG, attempt=2), at=100, phase="Running", status_has={"attempt": 2}),
    "second restart doubles the backoff": Case(
        status=status("Running", restarts=1, created=0, running_since=10),
        pods=(pod("j-actor-0", attempt=1), pod("j-critic-0", "Failed", exit_code=1, attempt=1)),
        at=500, phase="Restarting", restarts=2, deletes=GANG, events=["PodFailed", "GangRestart"], requeue=20),
    "exit 78 (bad config) is permanent: Failed, no restart": Case(
        status=RUNNING, pods=(pod("j-actor-0"), pod("j-critic-0", "Failed", exit_code=78,
                                                    message="hyperparameters.beta: must be > 0")),
        at=500, phase="Failed", restarts=0, deletes=["j-actor-0"], events=["PodFailed", "Failed"],
        cond=("Failed", "True", "PermanentError"),
        message_has=("j-critic-0", "exit code 78", "hyperparameters.beta: must be > 0")),
    "exit 65 (bad data) is permanent": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Failed", exit_code=65, message="train.jsonl:7: no prompt"),
                              pod("j-critic-0")),
        at=500, phase="Failed", deletes=["j-critic-0"], events=["PodFailed", "Failed"],
        cond=("Failed", "True", "PermanentError"), message_has=("j-actor-0", "65", "train.jsonl:7")),
    "a permanent error wins over a retryable one in the same pass": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Failed", exit_code=1), pod("j-critic-0", "Failed", exit_code=78)),
        at=500, phase="Failed", events=["PodFailed", "PodFailed", "Failed"],
        cond=("Failed", "True", "PermanentError"), message_has=("j-critic-0",)),
    "a retryable failure while peers still run: wait for the gang to settle": Case(
        status=RUNNING, pods=(pod("j-actor-0"), pod("j-critic-0", "Failed", exit_code=1, finished=498)),
        at=500, phase="Running", restarts=0, events=[], requeue=planner.FAILURE_SETTLE_SECONDS - 2),
    "the settle window over and a peer still runs: restart": Case(
        status=RUNNING, pods=(pod("j-actor-0"), pod("j-critic-0", "Failed", exit_code=1, finished=490)),
        at=500, phase="Restarting", restarts=1, deletes=GANG, events=["PodFailed", "GangRestart"], requeue=10),
    "every pod stopped within the window: decide at once": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Failed", exit_code=143, finished=499),
                              pod("j-critic-0", "Failed", exit_code=1, finished=498)),
        at=500, phase="Restarting", restarts=1, deletes=GANG, events=["PodFailed", "PodFailed", "GangRestart"],
        requeue=10),
    "a permanent code landing after its peer's retryable one still fails the job": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Failed", exit_code=78, finished=499,
                                  message="reward.callable: no module"),
                              pod("j-critic-0", "Failed", exit_code=1, finished=497)),
        at=500, phase="Failed", restarts=0, events=["PodFailed", "PodFailed", "Failed"],
        cond=("Failed", "True", "PermanentError"), message_has=("j-actor-0", "reward.callable")),
    # --- a permanent exit decides, however late it comes (issue 18, part 6)
    "a permanent exit after the restart was decided cancels the restart": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 10)),
        pods=(pod("j-actor-0", "Failed", exit_code=78, finished=15, terminating=True,
                  message="dataset.format: must be pairs"),),
        at=16, phase="Failed", restarts=1, events=["PodFailed", "Failed"], cond=("Failed", "True", "PermanentError"),
        message_has=("j-actor-0", "exit code 78", "dataset.format", "restart is cancelled")),
    "a permanent exit seen only once the backoff is over still beats the new gang": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 0)),
        pods=(pod("j-actor-0", "Failed", exit_code=65, finished=3, terminating=True),), at=60,
        phase="Failed", events=["PodFailed", "Failed"], cond=("Failed", "True", "PermanentError")),
    "a permanent exit of a pod someone else is deleting is permanent": Case(
        status=RUNNING, pods=(pod("j-actor-0"), pod("j-critic-0", "Failed", exit_code=78, terminating=True)),
        at=500, phase="Failed", restarts=0, deletes=["j-actor-0"], events=["PodFailed", "Failed"],
        cond=("Failed", "True", "PermanentError"), message_has=("j-critic-0",)),
    "a permanent exit of a gang that timed out is permanent": Case(
        status=status("Restarting", restarting=("GangTimeout", 300), gangTimeouts=1),
        pods=(pod("j-actor-0", "Failed", exit_code=78, finished=301),), at=302,
        phase="Failed", events=["PodFailed", "Failed"], cond=("Failed", "True", "PermanentError")),
    "a permanent exit long after the settle window, while peers still ran, fails the job": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 520)),
        pods=(pod("j-actor-0", "Failed", exit_code=78, finished=530, terminating=True),
              pod("j-critic-0", "Failed", exit_code=1, finished=500, terminating=True)),
        at=531, phase="Failed", events=["PodFailed", "Failed"], message_has=("j-actor-0",)),
    "a retryable exit of the old gang after the restart changes nothing": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 10)),
        pods=(pod("j-actor-0", "Failed", exit_code=143, finished=15, terminating=True),), at=16,
        phase="Restarting", restarts=1),
    "a pod two attempts old does not decide this gang": Case(
        status=status("Restarting", restarts=2, restarting=("PodFailed", 10)),
        pods=(pod("j-actor-0", "Failed", exit_code=78, finished=15, terminating=True, attempt=0),), at=16,
        phase="Restarting", restarts=2),
    "maxRestarts reached: Failed": Case(
        status=status("Running", restarts=3, created=0, running_since=10),
        pods=(pod("j-actor-0", attempt=3), pod("j-critic-0", "Failed", exit_code=1, attempt=3)),
        at=500, phase="Failed", restarts=3, deletes=["j-actor-0"], events=["PodFailed", "Failed"],
        cond=("Failed", "True", "ReachedMaxRestarts"), message_has=("3 restarts", "j-critic-0")),
    "maxRestarts 0: the first failure is final": Case(
        status=RUNNING, spec={"failurePolicy": {"maxRestarts": 0}},
        pods=(pod("j-actor-0", "Failed", exit_code=1), pod("j-critic-0")),
        at=500, phase="Failed", restarts=0, deletes=["j-critic-0"], cond=("Failed", "True", "ReachedMaxRestarts"),
        events=["PodFailed", "Failed"]),
    # --- success
    "actor exits 0: Succeeded, the other pods are deleted": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Succeeded", exit_code=0), pod("j-critic-0")), at=900,
        phase="Succeeded", deletes=["j-critic-0"], events=["Succeeded"], cond=("Succeeded", "True", "Succeeded")),
    "one of two actor replicas done: keep running": Case(
        status=RUNNING, spec={"roles": [{"name": "actor", "replicas": 2}, {"name": "critic"}, {"name": "reference"}]},
        pods=(pod("j-actor-0", "Succeeded", exit_code=0), pod("j-actor-1"), pod("j-critic-0"),
              pod("j-reference-0")), at=900, phase="Running"),
    "success wins over a pod that failed as the actor left": Case(
        status=RUNNING, pods=(pod("j-actor-0", "Succeeded", exit_code=0), pod("j-critic-0", "Failed", exit_code=1)),
        at=900, phase="Succeeded", events=["Succeeded"]),
    # --- stale pods
    "pods of an older attempt are deleted and never counted": Case(
        status=status("Running", restarts=1, created=0, running_since=10),
        pods=(*running(*GANG, attempt=1), pod("j-actor-1", attempt=0)), at=100,
        phase="Running", deletes=["j-actor-1"]),
    # --- suspend / resume
    "suspend: pods deleted, support objects kept": Case(
        status=RUNNING, spec={"suspend": True}, pods=running(*GANG), at=100,
        phase="Suspended", deletes=GANG, events=["Suspended"], cond=("Suspended", "True", "Suspended")),
    "suspended and quiet: nothing to do": Case(
        status=status("Suspended"), spec={"suspend": True}, at=100, phase="Suspended"),
    "created suspended: nothing is created": Case(
        status={}, spec={"suspend": True}, existing=frozenset(), phase="Suspended", events=["Suspended"]),
    "suspend while restarting cancels the restart": Case(
        status=status("Restarting", restarts=1, restarting=("PodFailed", 0)), spec={"suspend": True}, at=3,
        phase="Suspended", events=["Suspended"], cond=("Restarting", "False", "Suspended")),
    "resume: a new gang right away": Case(
        status=status("Suspended", startTime=ts(0)), at=1000, phase="Creating", creates=GANG,
        events=["Resumed", "GangCreated"], requeue=300, cond=("Suspended", "False", "Resumed")),
    "resume while the pods are still terminating: wait": Case(
        status=status("Suspended"), pods=(pod("j-actor-0", terminating=True),), at=1000,
        phase="Pending", events=["Resumed"]),
    # --- deadline
    "deadline pending: wake at the deadline": Case(
        status=RUNNING, spec={"activeDeadlineSeconds": 600}, pods=running(*GANG), at=100,
        phase="Running", requeue=500),
    "deadline before the gang timeout: the earlier wake-up wins": Case(
        status=CREATING, spec={"activeDeadlineSeconds": 120}, pods=(pod("j-actor-0"), pod("j-critic-0", "Pending")),
        at=100, phase="Creating", requeue=20),
    "deadline exceeded: Failed, pods deleted": Case(
        status=RUNNING, spec={"activeDeadlineSeconds": 600}, pods=running(*GANG), at=600,
        phase="Failed", deletes=GANG, events=["DeadlineExceeded"], cond=("Failed", "True", "DeadlineExceeded"),
        message_has=("600s",)),
    "suspended jobs have no deadline": Case(
        status=status("Suspended", startTime=ts(0)), spec={"suspend": True, "activeDeadlineSeconds": 10}, at=5000,
        phase="Suspended"),
    # --- finished jobs
    "finished, TTL not due: wake when it is": Case(
        status={"phase": "Succeeded", "completionTime": ts(0)}, spec={"ttlSecondsAfterFinished": 100}, at=40,
        phase="Succeeded", requeue=60),
    "finished, TTL due: delete the job": Case(
        status={"phase": "Failed", "completionTime": ts(0)}, spec={"ttlSecondsAfterFinished": 100}, at=100,
        phase="Failed", events=["TTLExpired"]),
    "finished, no TTL: kept forever": Case(
        status={"phase": "Succeeded", "completionTime": ts(0)}, at=10**6, phase="Succeeded"),
    "finished: leftover live pods deleted, terminated ones kept for their logs": Case(
        status={"phase": "Failed", "completionTime": ts(0)},
        pods=(pod("j-actor-0", "Failed", exit_code=78), pod("j-critic-0")), at=5,
        phase="Failed", deletes=["j-critic-0"]),
    "finished: no support object is recreated": Case(
        status={"phase": "Succeeded", "completionTime": ts(0)}, existing=frozenset(), at=5, phase="Succeeded"),
}


@pytest.mark.parametrize("name", CASES)
def test_plan(name):
    case = CASES[name]
    job = make_job(status=case.status, generation=case.generation, **case.spec)
    plan = planner.plan(job, Observed(case.pods, case.existing), T0 + timedelta(seconds=case.at), SETTINGS)
    if case.phase is not None:
        assert plan.status["phase"] == case.phase
    assert created_names(plan) == case.creates
    assert sorted(deleted_names(plan)) == sorted(case.deletes)
    assert event_reasons(plan) == case.events
    assert plan.requeue_after == (None if case.requeue is None else pytest.approx(case.requeue))
    if case.restarts is not None:
        assert plan.status["restarts"] == case.restarts
    if case.cond is not None:
        type_, want_status, reason = case.cond
        got = condition(plan, type_)
        assert got is not None, f"no {type_} condition in {plan.status.get('conditions')}"
        assert (got["status"], got["reason"]) == (want_status, reason)
        for text in case.message_has:
            assert text in got["message"]
    assert [a.obj["metadata"]["name"] for a in plan.actions if isinstance(a, planner.UpdateObject)] == case.updates
    marked = [a for a in plan.actions if isinstance(a, planner.AnnotatePods)]
    assert [n for a in marked for n in a.names] == case.annotates
    assert all(a.annotations == (("kueue.x-k8s.io/retriable-in-group", "false"),) for a in marked)
    for key, value in case.status_has.items():
        assert plan.status.get(key) == value, key
    assert plan.status["observedGeneration"] == case.generation
    assert sum(isinstance(a, DeleteJob) for a in plan.actions) == ("TTLExpired" in case.events)
    assert job.status == case.status  # the input is never mutated
    assert status_problems(plan.status) == []


# --- details that the table does not show ----------------------------------------------------


def test_new_gang_pods_carry_the_restart_attempt():
    job = make_job(status=status("Restarting", restarts=2, restarting=("PodFailed", 0)))
    plan = planner.plan(job, Observed((), SUPPORT), T0 + timedelta(seconds=60), SETTINGS)
    pods = [a.obj for a in plan.actions if isinstance(a, CreateObject)]
    assert [p["metadata"]["labels"][LABEL_RESTART_ATTEMPT] for p in pods] == ["2", "2"]
    for p in pods:
        env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
        assert env["RLHF_RESTART_ATTEMPT"] == "2"
    assert plan.status["gangCreatedTime"] == ts(60)


def test_restart_records_time_and_keeps_first_running_time():
    job = make_job(status=planner.plan(make_job(status=CREATING), Observed(running(*GANG), SUPPORT),
                                       T0 + timedelta(seconds=12), SETTINGS).status)
    assert job.status["runningTime"] == ts(12)
    failed = (pod("j-actor-0"), pod("j-critic-0", "Failed", exit_code=1))
    plan = planner.plan(job, Observed(failed, SUPPORT), T0 + timedelta(seconds=99), SETTINGS)
    assert plan.status["lastRestartTime"] == ts(99)
    assert plan.status["runningTime"] == ts(12)
    assert "gangCreatedTime" not in plan.status
    assert condition(plan, "Created")["status"] == "False"
    assert condition(plan, "Running")["status"] == "False"


def test_finishing_sets_completion_time_and_deletes_the_pod_group():
    job = make_job(status=RUNNING, scheduling={"gangScheduler": "volcano"})
    pods = (pod("j-actor-0", "Succeeded", exit_code=0), pod("j-critic-0"))
    plan = planner.plan(job, Observed(pods, SUPPORT | {("PodGroup", "j")}), T0 + timedelta(seconds=70), SETTINGS)
    assert plan.status["completionTime"] == ts(70)
    assert DeleteObject("scheduling.volcano.sh/v1beta1", "PodGroup", "j") in plan.actions


def test_role_counts_cover_the_current_attempt_only():
    job = make_job(status=status("Creating", restarts=1, created=0),
                   roles=[{"name": "actor", "replicas": 2}, {"name": "critic"}, {"name": "reference"}])
    pods = (pod("j-actor-0", attempt=1), pod("j-actor-1", "Pending", attempt=1), pod("j-critic-0", attempt=1),
            pod("j-reference-0", "Pending", attempt=1), pod("j-critic-1", "Failed", exit_code=1, attempt=0))
    plan = planner.plan(job, Observed(pods, SUPPORT), T0 + timedelta(seconds=5), SETTINGS)
    assert plan.status["roles"] == {
        "actor": {"desired": 2, "pending": 1, "running": 1, "succeeded": 0, "failed": 0},
        "critic": {"desired": 1, "pending": 0, "running": 1, "succeeded": 0, "failed": 0},
        "reference": {"desired": 1, "pending": 1, "running": 0, "succeeded": 0, "failed": 0},
    }
    assert deleted_names(plan) == ["j-critic-1"]


def test_pods_a_pass_creates_count_as_pending_so_their_arrival_changes_no_status():
    job = make_job(roles=[{"name": "actor", "replicas": 2}, {"name": "critic"},
                          {"name": "reference", "colocateWith": "actor"}])
    first = planner.plan(job, Observed((), SUPPORT), T0, SETTINGS)
    assert created_names(first) == ["j-actor-0", "j-actor-1", "j-critic-0"]
    assert {role: c["pending"] for role, c in first.status["roles"].items()} == {"actor": 2, "critic": 1}
    arrived = tuple(pod(n, "Pending") for n in created_names(first))
    second = planner.plan(dataclasses.replace(job, status=first.status), Observed(arrived, SUPPORT),
                          T0 + timedelta(seconds=1), SETTINGS)
    assert second.actions == () and second.status == first.status


def test_progress_is_copied_and_the_last_known_kept():
    job = make_job(status={**RUNNING, "progress": {"step": 3}})
    plan = planner.plan(job, Observed(running(*GANG), SUPPORT), T0, SETTINGS)
    assert plan.status["progress"] == {"step": 3}
    plan = planner.plan(job, Observed(running(*GANG), SUPPORT, progress={"step": 4, "kl": 0.1}), T0, SETTINGS)
    assert plan.status["progress"] == {"step": 4, "kl": 0.1}


def test_observed_generation_follows_the_job():
    plan = planner.plan(make_job(status=RUNNING, generation=7), Observed(running(*GANG), SUPPORT), T0, SETTINGS)
    assert plan.status["observedGeneration"] == 7


def test_invalid_spec_status_and_recovery_once_the_spec_is_fixed():
    bad = planner.invalid_spec_status({"phase": "Running", "restarts": 1}, 4, "spec.roles[1].replicas: must be >= 1",
                                      T0)
    assert bad["phase"] == "Failed"
    assert bad["observedGeneration"] == 4
    assert bad["restarts"] == 1
    failed = planner.get_condition(bad, "Failed")
    assert (failed["status"], failed["reason"], failed["message"], failed["lastTransitionTime"]) == (
        "True", "InvalidSpec", "spec.roles[1].replicas: must be >= 1", ts(0))

    plan = planner.plan(make_job(status=bad, generation=5), Observed((), SUPPORT), T0 + timedelta(seconds=30),
                        SETTINGS)
    assert plan.status["phase"] == "Creating"
    assert event_reasons(plan) == ["SpecFixed", "GangCreated"]
    assert condition(plan, "Failed")["status"] == "False"


def test_an_other_failure_stays_final():
    job = make_job(status={"phase": "Failed", "completionTime": ts(0),
                           "conditions": [{"type": "Failed", "status": "True", "reason": "PermanentError",
                                           "message": "x", "lastTransitionTime": ts(0)}]})
    plan = planner.plan(job, Observed((), SUPPORT), T0 + timedelta(seconds=30), SETTINGS)
    assert plan.status["phase"] == "Failed"
    assert plan.actions == ()


def test_condition_transition_time_changes_only_when_the_status_flips():
    st: dict = {}
    planner.set_condition(st, "Running", True, "A", "first", T0)
    planner.set_condition(st, "Running", True, "B", "second", T0 + timedelta(seconds=5))
    assert st["conditions"] == [{"type": "Running", "status": "True", "reason": "B", "message": "second",
                                 "lastTransitionTime": ts(0)}]
    planner.set_condition(st, "Running", False, "C", "", T0 + timedelta(seconds=9))
    assert st["conditions"][0]["lastTransitionTime"] == ts(9)
    planner.set_condition(st, "Failed", True, "D", "", T0)
    assert [c["type"] for c in st["conditions"]] == ["Running", "Failed"]


BACKOFFS = {
    "no restart yet": (10, 0, 0),
    "first restart": (10, 1, 10),
    "third restart": (10, 3, 40),
    "capped": (10, 20, MAX_BACKOFF_SECONDS),
    "zero base": (0, 5, 0),
}


@pytest.mark.parametrize("name", BACKOFFS)
def test_backoff_seconds(name):
    base, attempt, want = BACKOFFS[name]
    assert planner.backoff_seconds(base, attempt) == want


def test_times_are_rfc3339_utc_and_naive_now_means_utc():
    assert planner.format_time(T0) == "2026-03-01T12:00:00Z"
    assert planner.parse_time("2026-03-01T12:00:00Z") == T0
    assert planner.parse_time("2026-03-01T13:00:00+01:00") == T0
    assert planner.parse_time("yesterday") is None
    naive = planner.plan(make_job(), Observed((), SUPPORT), T0.replace(tzinfo=None), SETTINGS)
    assert naive.status["startTime"] == ts(0)


# --- observe_pod -----------------------------------------------------------------------------

LABELS = {"rlhf.dev/job": "j", "rlhf.dev/role": "critic", "rlhf.dev/role-index": "1", "rlhf.dev/restart-attempt": "2"}

OBSERVE_CASES = {
    "just created, no status yet": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS, "creationTimestamp": "2026-03-01T12:00:00Z"}},
        dict(phase="Pending", exit_code=None, reason="", message="", terminating=False, created_at=T0),
    ),
    "running": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}},
        dict(phase="Running", exit_code=None, created_at=None),
    ),
    "failed with a termination message": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
             "exitCode": 78, "reason": "Error", "message": "bad config\n"}}}]}},
        dict(phase="Failed", exit_code=78, reason="Error", message="bad config"),
    ),
    "evicted: only a pod-level reason": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}},
        dict(phase="Failed", exit_code=None, reason="Evicted", message="The node was low on resource: memory."),
    ),
    "an image that cannot be pulled": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {
             "reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\"\n"}}}]}},
        dict(phase="Pending", waiting_reason="ImagePullBackOff", waiting_message='Back-off pulling image "x"'),
    ),
    "an init container that cannot start comes first": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Pending",
                    "initContainerStatuses": [{"name": "fetch", "state": {"waiting": {
                        "reason": "CreateContainerConfigError", "message": "secret \"s\" not found"}}}],
                    "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}]}},
        dict(waiting_reason="CreateContainerConfigError", waiting_message='secret "s" not found'),
    ),
    "unschedulable: the scheduler's condition": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                        "reason": "Unschedulable", "message": "0/2 nodes"}]}},
        dict(waiting_reason="Unschedulable", waiting_message="0/2 nodes"),
    ),
    "a container being created is no reason": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {
             "reason": "ContainerCreating"}}}]}},
        dict(waiting_reason="", waiting_message=""),
    ),
    "preempted: the DisruptionTarget condition names the disruption": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Failed", "conditions": [
             {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
              "message": "default-scheduler: preempting to accommodate a higher priority pod"}],
             "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 143}}}]}},
        dict(phase="Failed", exit_code=143, disruption="PreemptionByScheduler",
             message="default-scheduler: preempting to accommodate a higher priority pod"),
    ),
    "evicted by the kubelet: the pod's reason is the disruption": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}},
        dict(disruption="Evicted"),
    ),
    "a failure is no disruption": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "False"}],
                    "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1}}}]}},
        dict(exit_code=1, disruption=""),
    ),
    "the source initializer failed: its code and message are the pod's": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Failed",
                    "initContainerStatuses": [{"name": "source-initializer", "state": {"terminated": {
                        "exitCode": 78, "message": "source initializer: hf://org/x: RepositoryNotFoundError"}}}],
                    "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}]}},
        dict(exit_code=78, message="source initializer: hf://org/x: RepositoryNotFoundError"),
    ),
    "a succeeded init container leaves the trainer's state": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS},
         "status": {"phase": "Failed",
                    "initContainerStatuses": [{"name": "source-initializer", "state": {"terminated": {"exitCode": 0}}}],
                    "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1}}}]}},
        dict(exit_code=1),
    ),
    "being deleted": (
        {"metadata": {"name": "j-critic-1", "labels": LABELS, "deletionTimestamp": "2026-03-01T12:00:00Z"},
         "status": {"phase": "Running"}},
        dict(phase="Running", terminating=True),
    ),
    "garbled labels make a stale pod": (
        {"metadata": {"name": "j-critic-1", "labels": {**LABELS, "rlhf.dev/restart-attempt": "x",
                                                        "rlhf.dev/role-index": ""}}},
        dict(attempt=-1, index=-1),
    ),
}


@pytest.mark.parametrize("name", OBSERVE_CASES)
def test_observe_pod(name):
    obj, want = OBSERVE_CASES[name]
    observed = planner.observe_pod(obj)
    assert observed.name == "j-critic-1"
    assert observed.role == "critic"
    defaults = dict(index=1, attempt=2)
    for key, value in {**defaults, **want}.items():
        assert getattr(observed, key) == value, key


# --- idempotency and a whole life ------------------------------------------------------------


def test_planning_twice_on_one_observation_gives_the_same_plan():
    for case in CASES.values():
        job = make_job(status=case.status, **case.spec)
        observed = Observed(case.pods, case.existing)
        now = T0 + timedelta(seconds=case.at)
        assert planner.plan(job, observed, now, SETTINGS) == planner.plan(job, observed, now, SETTINGS)


def test_a_lost_status_write_creates_only_what_is_missing():
    """The shell created the pods but crashed before writing status: no pod is created twice."""
    job = make_job()
    first = planner.plan(job, Observed((), frozenset()), T0, SETTINGS)
    made = frozenset((a.obj["kind"], a.obj["metadata"]["name"]) for a in first.actions
                     if isinstance(a, CreateObject) and a.obj["kind"] != "Pod")
    again = planner.plan(job, Observed((pod("j-actor-0", "Pending"),), made), T0 + timedelta(seconds=1), SETTINGS)
    assert created_names(again) == ["j-critic-0"]
    settled = planner.plan(make_job(status=again.status), Observed((pod("j-actor-0", "Pending"),), made),
                           T0 + timedelta(seconds=2), SETTINGS)
    assert created_names(settled) == []


class FakeCluster:
    """Executes plans like a shell would and plays the kubelet, to check whole lifecycles."""

    def __init__(self, job):
        self.job = job
        self.pods: dict[str, ObservedPod] = {}
        self.existing: set[tuple[str, str]] = set()
        self.events: list[str] = []
        self.created_pods: list[tuple[str, int]] = []
        self.deleted = False

    def reconcile(self, now):
        plan = planner.plan(self.job, Observed(tuple(self.pods.values()), frozenset(self.existing)), now, SETTINGS)
        for action in plan.actions:
            if isinstance(action, CreateObject):
                meta = action.obj["metadata"]
                if action.obj["kind"] == "Pod":
                    assert meta["name"] not in self.pods, f"{meta['name']} created twice"
                    attempt = int(meta["labels"][LABEL_RESTART_ATTEMPT])
                    self.pods[meta["name"]] = pod(meta["name"], "Pending", attempt=attempt)
                    self.created_pods.append((meta["name"], attempt))
                else:
                    self.existing.add((action.obj["kind"], meta["name"]))
            elif isinstance(action, DeletePods):
                for name in action.names:  # deletion is immediate here
                    self.pods.pop(name)
            elif isinstance(action, DeleteJob):
                self.deleted = True
            elif isinstance(action, EmitEvent):
                self.events.append(action.reason)
        self.job = dataclasses.replace(self.job, status=plan.status)
        return plan

    def set_phase(self, name, phase, exit_code=None):
        self.pods[name] = dataclasses.replace(self.pods[name], phase=phase, exit_code=exit_code)


def test_whole_life_with_one_failure_resumes_and_succeeds():
    cluster = FakeCluster(make_job(ttlSecondsAfterFinished=60))
    now = T0
    cluster.reconcile(now)
    assert sorted(cluster.pods) == GANG
    for name in GANG:
        cluster.set_phase(name, "Running")
    cluster.reconcile(now := now + timedelta(seconds=5))
    assert cluster.job.status["phase"] == "Running"

    cluster.set_phase("j-critic-0", "Failed", exit_code=137)
    plan = cluster.reconcile(now := now + timedelta(seconds=100))
    assert (cluster.job.status["phase"], cluster.pods) == ("Restarting", {})
    assert plan.requeue_after == 10
    plan = cluster.reconcile(now := now + timedelta(seconds=3))  # woken early by the deletion events
    assert cluster.pods == {} and plan.requeue_after == pytest.approx(7)
    cluster.reconcile(now := now + timedelta(seconds=7))
    assert {cluster.pods[n].attempt for n in GANG} == {1}

    for name in GANG:
        cluster.set_phase(name, "Running")
    cluster.reconcile(now := now + timedelta(seconds=5))
    cluster.set_phase("j-actor-0", "Succeeded", exit_code=0)
    plan = cluster.reconcile(now := now + timedelta(seconds=500))
    assert cluster.job.status["phase"] == "Succeeded"
    assert list(cluster.pods) == ["j-actor-0"]  # the critic was deleted, the actor kept for its logs
    assert plan.requeue_after == 60
    cluster.reconcile(now + timedelta(seconds=60))
    assert cluster.deleted
    assert cluster.events == ["GangCreated", "Running", "PodFailed", "GangRestart", "GangCreated", "Running",
                              "Succeeded", "TTLExpired"]
    assert cluster.created_pods == [("j-actor-0", 0), ("j-critic-0", 0), ("j-actor-0", 1), ("j-critic-0", 1)]
    assert cluster.job.status["restarts"] == 1


def test_whole_life_with_every_duration_at_its_maximum():
    """The planner adds each duration to a timestamp: at the spec's maximum (api.MAX_DURATION_SECONDS)
    every step of a job's life plans, and each wake-up is the duration left, not an OverflowError."""
    longest = api.MAX_DURATION_SECONDS
    cluster = FakeCluster(make_job(
        activeDeadlineSeconds=longest, ttlSecondsAfterFinished=longest, terminationGracePeriodSeconds=longest,
        scheduling={"gangTimeoutSeconds": longest}, failurePolicy={"backoffSeconds": longest}))
    now = T0
    plan = cluster.reconcile(now)
    assert sorted(cluster.pods) == GANG and plan.requeue_after == longest  # the gang timeout's wake-up
    for name in GANG:
        cluster.set_phase(name, "Running")
    plan = cluster.reconcile(now := now + timedelta(seconds=5))
    assert cluster.job.status["phase"] == "Running" and plan.requeue_after == longest - 5  # the deadline's, from T0
    cluster.set_phase("j-critic-0", "Failed", exit_code=137)
    cluster.reconcile(now := now + timedelta(seconds=5))
    plan = cluster.reconcile(now := now + timedelta(seconds=5))
    assert cluster.job.status["phase"] == "Restarting"
    assert plan.requeue_after == pytest.approx(planner.MAX_BACKOFF_SECONDS, abs=10)  # the backoff is capped
    cluster.reconcile(now := now + timedelta(seconds=planner.MAX_BACKOFF_SECONDS))
    for name in GANG:
        cluster.set_phase(name, "Running")
    cluster.reconcile(now := now + timedelta(seconds=5))
    cluster.set_phase("j-actor-0", "Succeeded", exit_code=0)
    plan = cluster.reconcile(now := now + timedelta(seconds=5))
    # the TTL's, from the completion: not the deadline's, which a finished job no longer has
    assert cluster.job.status["phase"] == "Succeeded" and plan.requeue_after == longest
    plan = cluster.reconcile(now := now + timedelta(seconds=5))
    assert plan.requeue_after == longest - 5


def test_whole_life_that_keeps_failing_stops_at_max_restarts():
    cluster = FakeCluster(make_job(failurePolicy={"maxRestarts": 2, "backoffSeconds": 1}))
    now = T0
    for _ in range(20):
        plan = cluster.reconcile(now)
        if cluster.job.status["phase"] == "Failed":
            break
        if cluster.pods:  # a gang is up: it runs, then its actor crashes
            for name in list(cluster.pods):
                cluster.set_phase(name, "Running")
            cluster.reconcile(now)
            cluster.set_phase("j-actor-0", "Failed", exit_code=1)
        now += timedelta(seconds=plan.requeue_after or 1)
    assert cluster.job.status["phase"] == "Failed"
    assert planner.get_condition(cluster.job.status, "Failed")["reason"] == "ReachedMaxRestarts"
    assert cluster.job.status["restarts"] == 2
    assert [a for _, a in cluster.created_pods] == [0, 0, 1, 1, 2, 2]
    assert cluster.events.count("GangRestart") == 2


def _set_suspend(job, value: bool):
    return dataclasses.replace(job, spec=dataclasses.replace(job.spec, suspend=value))


@pytest.mark.parametrize("seed", range(40))
def test_random_histories_keep_the_invariants(seed):
    """Random kubelet outcomes, slow deletions, cache lag and suspend toggles, then a healthy
    finale: no pod is created twice, pods always belong to the current attempt, restarts stay
    within maxRestarts, and the job always ends."""
    import random

    rng = random.Random(seed)
    max_restarts = rng.choice([0, 1, 3])
    cluster = FakeCluster(make_job(
        roles=[{"name": "actor", "replicas": 2}, {"name": "critic"}, {"name": "reference", "colocateWith": "actor"}],
        failurePolicy={"maxRestarts": max_restarts, "backoffSeconds": rng.choice([1, 10, 30])},
        scheduling={"gangTimeoutSeconds": 60}))
    terminating: set[str] = set()
    now = T0
    finished_at = None
    for step in range(160):
        healthy = step >= 100  # the finale: nothing goes wrong any more
        # the kubelet: slow deletions finish, pods start, fail, succeed, get deleted by others
        for name in list(terminating):
            if rng.random() < 0.6:
                cluster.pods.pop(name, None)
                terminating.discard(name)
        for name, p in list(cluster.pods.items()):
            if name in terminating:
                continue
            roll = rng.random()
            if p.phase == "Pending" and roll < 0.7:
                cluster.set_phase(name, "Running")
            elif p.phase == "Running" and not healthy and roll < 0.05:
                cluster.set_phase(name, "Failed", exit_code=rng.choice([1, 137, 1, 78]))
            elif p.phase == "Running" and not healthy and roll < 0.07:
                cluster.pods[name] = dataclasses.replace(p, terminating=True)
                terminating.add(name)
            elif p.phase == "Running" and p.role == "actor" and (healthy or roll < 0.1) and rng.random() < 0.5:
                cluster.set_phase(name, "Succeeded", exit_code=0)
        if not healthy and rng.random() < 0.05:
            cluster.job = _set_suspend(cluster.job, not cluster.job.spec.suspend)
        if healthy and cluster.job.spec.suspend:
            cluster.job = _set_suspend(cluster.job, False)

        # deletions of this pass happen slowly: mark the pods terminating instead of removing them
        before = dict(cluster.pods)
        plan = cluster.reconcile(now)
        for name in set(before) - set(cluster.pods):
            cluster.pods[name] = dataclasses.replace(before[name], terminating=True)
            terminating.add(name)

        st = cluster.job.status
        assert st["phase"] in PHASES
        assert st["restarts"] <= max_restarts
        assert plan.requeue_after is None or plan.requeue_after > 0
        live = [p for p in cluster.pods.values() if not p.terminating]
        if st["phase"] in ("Creating", "Running"):
            assert {p.attempt for p in live} <= {st["attempt"]}
        counted = sum(sum(v for k, v in counts.items() if k != "desired") for counts in st["roles"].values())
        assert counted <= len(cluster.pods)
        if finished_at is not None:
            assert st["phase"] == finished_at, "a finished job never changes phase"
        elif st["phase"] in ("Succeeded", "Failed"):
            finished_at = st["phase"]
        now += timedelta(seconds=plan.requeue_after if plan.requeue_after and rng.random() < 0.5
                         else rng.choice([0.5, 5, 30]))
    assert finished_at in ("Succeeded", "Failed"), cluster.job.status
    attempts = [a for _, a in cluster.created_pods]
    assert attempts == sorted(attempts), "gangs are created in attempt order"


def test_a_child_rejected_failure_holds_until_the_spec_is_edited():
    rejected = planner.child_rejected_status({"phase": "Creating", "restarts": 0}, 1,
                                             "the API server refused Service j: invalid", T0)
    assert rejected["phase"] == "Failed" and rejected["completionTime"] == ts(0)
    assert condition(planner.Plan((), rejected, None), "Failed")["reason"] == planner.REASON_CHILD_REJECTED
    same = planner.plan(make_job(status=rejected), Observed((pod("j-actor-0"),), SUPPORT), T0 + timedelta(seconds=5),
                        SETTINGS)
    assert same.status["phase"] == "Failed" and created_names(same) == [] and deleted_names(same) == ["j-actor-0"]
    edited = planner.plan(make_job(status=rejected, generation=2), Observed((), SUPPORT), T0 + timedelta(seconds=9),
                          SETTINGS)
    assert edited.status["phase"] == "Creating"
    assert event_reasons(edited) == ["SpecFixed", "GangCreated"]


def test_trainer_alarms_set_degraded_and_warn_once_per_reason():
    alarm = {"NegativeKL": "mean KL -0.2 < -0.05"}
    job = make_job(status={**RUNNING, "progress": {"step": 3, "alarms": {}}})
    plan = planner.plan(job, Observed(running(*GANG), SUPPORT, progress={"step": 4, "alarms": alarm}), T0, SETTINGS)
    degraded = condition(plan, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "NegativeKL"
    assert status_problems(plan.status) == []  # the CRD lacked Degraded: every status write was refused
    assert degraded["message"] == "NegativeKL: mean KL -0.2 < -0.05"
    warnings = [a for a in plan.actions if isinstance(a, planner.EmitEvent) and a.type == "Warning"]
    assert [(w.reason, w.message) for w in warnings] == [("NegativeKL", "mean KL -0.2 < -0.05")]
    # The next pass with the same alarm: still Degraded, no second event; a new reason warns once more.
    job = make_job(status=plan.status)
    both = {**alarm, "LengthCollapse": "4 tokens, 60% below"}
    plan = planner.plan(job, Observed(running(*GANG), SUPPORT, progress={"step": 5, "alarms": both}), T0, SETTINGS)
    assert [a.reason for a in plan.actions if isinstance(a, planner.EmitEvent)] == ["LengthCollapse"]
    assert condition(plan, "Degraded")["reason"] == "NegativeKL"
    # None firing: Degraded False and one Normal event.
    job = make_job(status=plan.status)
    plan = planner.plan(job, Observed(running(*GANG), SUPPORT, progress={"step": 6, "alarms": {}}), T0, SETTINGS)
    assert condition(plan, "Degraded")["status"] == "False" and condition(plan, "Degraded")["reason"] == "AlarmsCleared"
    assert [(a.type, a.reason) for a in plan.actions if isinstance(a, planner.EmitEvent)] == [("Normal", "AlarmsCleared")]


def test_no_alarms_key_no_degraded_condition():
    job = make_job(status={**RUNNING})
    plan = planner.plan(job, Observed(running(*GANG), SUPPORT, progress={"step": 4}), T0, SETTINGS)
    assert condition(plan, "Degraded") is None
    assert not any(isinstance(a, planner.EmitEvent) and a.reason == "AlarmsCleared" for a in plan.actions)


def test_a_kueue_gang_keeps_its_pod_group_across_suspend_and_resume_and_a_restart_starts_a_new_one():
    """Kueue admits a pod group as one workload and keeps it (and its quota) until the group's pods say they
    are not retriable. The gang a resume recreates is the same attempt, so it joins the same group (no
    second workload queued behind the first, none left holding quota); a gang restart is a new attempt
    and a new group (Kueue finalizes a group once one of its pods failed)."""
    cluster = FakeCluster(make_job(scheduling={"queue": "team-a"}))
    groups: list[tuple[str, str, str]] = []  # (pod, group name, group total count) per pod created

    def reconcile(now):
        plan = cluster.reconcile(now)
        for action in plan.actions:
            if isinstance(action, CreateObject) and action.obj["kind"] == "Pod":
                meta = action.obj["metadata"]
                groups.append((meta["name"], meta["labels"][builders.LABEL_KUEUE_POD_GROUP],
                               meta["annotations"][builders.ANNOTATION_KUEUE_POD_GROUP_TOTAL]))
        return plan

    now = T0
    reconcile(now)
    for name in GANG:
        cluster.set_phase(name, "Running")
    reconcile(now := now + timedelta(seconds=5))
    cluster.job = _set_suspend(cluster.job, True)
    reconcile(now := now + timedelta(seconds=5))
    assert cluster.job.status["phase"] == "Suspended" and cluster.pods == {}
    cluster.job = _set_suspend(cluster.job, False)
    for _ in range(3):  # resume, then the PodGroup's creation, then the gang
        reconcile(now := now + timedelta(seconds=5))
    assert sorted(cluster.pods) == GANG
    for name in GANG:
        cluster.set_phase(name, "Running")
    reconcile(now := now + timedelta(seconds=5))
    cluster.set_phase("j-critic-0", "Failed", exit_code=1)
    for _ in range(4):
        reconcile(now := now + timedelta(seconds=60))
    first, resumed, restarted = groups[0:2], groups[2:4], groups[4:6]
    assert first == [("j-actor-0", "j-attempt-0", "2"), ("j-critic-0", "j-attempt-0", "2")]
    assert resumed == first, groups
    assert restarted == [("j-actor-0", "j-attempt-1", "2"), ("j-critic-0", "j-attempt-1", "2")], groups
