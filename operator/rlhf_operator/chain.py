"""Jobs that start from other jobs (`fromJob`): what a job waits for, when a source fails it, and which
source volumes its pods mount (docs/spec.md "Chaining jobs"). Pure: the shells hand in what they see
of the namespace's other RLHFJobs as PeerJob records; planner.plan() applies the Gate.

    stackllama-sft  --model.fromJob-->        stackllama-rm
    stackllama-sft  --model.fromJob-->        stackllama-ppo  <--rewardModel.fromJob--  stackllama-rm

A dependant stays Pending (condition SourcesReady=False, status.waitingFor) until every job it names
has Succeeded; then each source's export folder is mounted read-only from that job's checkpoint volume
(builders.source_volumes) and the names, uids and claims are recorded in status.sources, which holds
for the rest of the job's life (a gang restart mounts the same claims even if a source job was deleted
meanwhile). A source that Failed fails the dependant (SourceFailed); a source that exports the wrong kind
of model (a reward model as `model`) fails it too (SourceMismatch); a cycle of fromJob names fails every
job on it (SourceCycle; a job naming itself is refused at admission instead).

Kubeflow Pipelines and Argo Workflows behave the same way: a step runs once its dependencies succeeded,
and a failed dependency fails the run; here each step is an RLHFJob of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlhf_contract.algorithms import ALGORITHMS

from rlhf_operator.api import FINISHED_PHASES, Job, JobSpec
from rlhf_operator.builders import pvc_name

# What each manifest field that can name a job needs the source to export (algorithms.EXPORT_KINDS). The
# PPO critic starts from one of these two (critic.model: policy | reward), so it follows them.
WANTS = {"model": ("policy",), "rewardModel": ("reward", "prm")}

# Condition type and reasons a chained job's status uses.
CONDITION = "SourcesReady"
WAITING, SUCCEEDED = "WaitingForSource", "SourcesSucceeded"
SOURCE_FAILED, SOURCE_MISMATCH, SOURCE_CYCLE = "SourceFailed", "SourceMismatch", "SourceCycle"


@dataclass(frozen=True)
class PeerJob:
    """What a job's pass needs to know of another RLHFJob of its namespace."""

    name: str
    uid: str = ""
    phase: str = ""  # status.phase; "" before the operator's first pass over it
    algorithm: str = ""  # "" when its spec does not parse
    claim: str = ""  # its checkpoint claim: existingClaim or <name>-checkpoints
    claim_owned: bool = False  # the claim is ours and owned by the job (retain: false): it goes with the job
    from_jobs: tuple[str, ...] = ()  # the jobs it names in fromJob
    failure: str = ""  # "Reason: message" of its Failed condition

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


def peer_of(name: str, uid: str, spec: JobSpec | None, status: Mapping[str, Any]) -> PeerJob:
    """A PeerJob from a job's name, uid, parsed spec (None when it does not parse) and status."""
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"
                   and c.get("status") == "True"), {})
    failure = f"{failed.get('reason', '')}: {failed.get('message', '')}" if failed else ""
    if spec is None:
        return PeerJob(name, uid, str(status.get("phase") or ""), failure=failure)
    volume = spec.checkpoint.volume
    return PeerJob(name, uid, str(status.get("phase") or ""), spec.algorithm,
                   claim=volume.existing_claim or pvc_name(name),
                   claim_owned=not volume.existing_claim and not volume.retain,
                   from_jobs=spec.from_jobs(), failure=failure)


@dataclass(frozen=True)
class Source:
    """A source job as a dependant records it in status.sources once every source Succeeded."""

    name: str
    uid: str
    claim: str

    def to_status(self) -> dict[str, str]:
        return {"name": self.name, "uid": self.uid, "claim": self.claim}


@dataclass(frozen=True)
class Gate:
    """Whether a job may start. state: none (names no job) | ready | waiting | failed.

    ready: `sources` to mount; `protect` the sources whose claim goes with their job (retain: false),
    which the dependant co-owns so that deleting the source job leaves the claim to the dependant.
    waiting: `waiting_for` names the jobs; failed: `reason` and `message` for the Failed condition.
    """

    state: str
    reason: str = ""
    message: str = ""
    waiting_for: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()
    protect: tuple[str, ...] = ()  # claim names


NO_SOURCES = Gate("none")


def recorded_sources(status: Mapping[str, Any]) -> tuple[Source, ...]:
    """status.sources as written when the job's sources were ready (() before)."""
    return tuple(Source(str(s.get("name", "")), str(s.get("uid", "")), str(s.get("claim", "")))
                 for s in status.get("sources") or [] if isinstance(s, dict))


def find_cycle(start: str, edges: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """A path start -> ... -> start along `edges` (job -> the jobs it names), or None.

    Depth-first over the jobs reachable from `start`; each job is expanded once, so the cost is linear
    in the edges seen. Only cycles through `start` count: a job downstream of a cycle waits for the jobs on
    it, which fail themselves, and then fails as their dependant.
    """
    path: list[str] = [start]
    seen: set[str] = set()

    def walk(node: str) -> bool:
        for nxt in edges.get(node, ()):
            if nxt == start:
                return True
            if nxt in seen:
                continue
            seen.add(nxt)
            path.append(nxt)
            if walk(nxt):
                return True
            path.pop()
        return False

    return [*path, start] if walk(start) else None


def _kind_problem(key: str, peer: PeerJob) -> str:
    exports = ALGORITHMS[peer.algorithm].exports if peer.algorithm in ALGORITHMS else ""
    if not exports or exports in WANTS[key]:
        return ""
    want = " or ".join(WANTS[key])
    return (f"spec.{key}.fromJob names RLHFJob {peer.name} (algorithm {peer.algorithm}), which exports a {exports} "
            f"model; {key} needs a {want} model")


def _describe(name: str, peer: PeerJob | None) -> str:
    if peer is None:
        return f"{name} (not found)"
    return f"{name} ({peer.phase or 'new'})"


def gate(job: Job, peers: Mapping[str, PeerJob]) -> Gate:
    """May `job` start, given the other jobs of its namespace (at least those it names, transitively)?"""
    names = job.spec.from_jobs()
    if not names:
        return NO_SOURCES
    recorded = recorded_sources(job.status)
    if recorded and {s.name for s in recorded} >= set(names):
        return Gate("ready", SUCCEEDED, sources=recorded)
    edges = {**{p.name: p.from_jobs for p in peers.values()}, job.name: names}
    cycle = find_cycle(job.name, edges)
    if cycle:
        return Gate("failed", SOURCE_CYCLE, f"fromJob names a cycle: {' -> '.join(cycle)}; no job on it can start")
    for key, source in job.spec.model_sources():
        peer = peers.get(source.from_job) if source.from_job else None
        if peer is None:
            continue
        if peer.phase == "Failed":
            return Gate("failed", SOURCE_FAILED, f"spec.{key}.fromJob: RLHFJob {peer.name} failed, so its model "
                                                 f"never came ({peer.failure or 'no reason given'})")
        problem = _kind_problem(key, peer)
        if problem:
            return Gate("failed", SOURCE_MISMATCH, problem)
    waiting = tuple(n for n in names if peers.get(n) is None or peers[n].phase != "Succeeded")
    if waiting:
        listed = ", ".join(_describe(n, peers.get(n)) for n in waiting)
        return Gate("waiting", WAITING, f"waiting for RLHFJob {listed} to succeed", waiting_for=waiting)
    ready = tuple(Source(n, peers[n].uid, peers[n].claim) for n in names)
    return Gate("ready", SUCCEEDED, "", sources=ready,
                protect=tuple(peers[n].claim for n in names if peers[n].claim_owned))


def ready_message(sources: tuple[Source, ...]) -> str:
    return "models from " + ", ".join(f"RLHFJob {s.name} (claim {s.claim}, read-only)" for s in sources)


def dependants(name: str, peers: Mapping[str, PeerJob]) -> tuple[str, ...]:
    """Unfinished jobs that name `name` in fromJob: they still need its job object and its volume."""
    return tuple(sorted(p.name for p in peers.values() if name in p.from_jobs and not p.finished))


def related_peers(name: str, from_jobs: tuple[str, ...], every: Mapping[str, PeerJob]) -> dict[str, PeerJob]:
    """The peers a pass over `name` needs out of all jobs of the namespace: the jobs it names, transitively
    (for cycles), and the jobs naming it (its dependants, for the TTL)."""
    found: dict[str, PeerJob] = {}
    todo = list(from_jobs)
    while todo:
        other = todo.pop()
        if other in found or other == name or other not in every:
            continue
        found[other] = every[other]
        todo.extend(every[other].from_jobs)
    found.update({p.name: p for p in every.values() if name in p.from_jobs and p.name != name})
    return found

