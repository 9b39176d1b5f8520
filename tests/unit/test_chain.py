"""Jobs from jobs (`fromJob`): chain.gate() as named cases, and the planner and builders around it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from rlhf_contract.config import parse_config
from rlhf_operator import chain, planner
from rlhf_operator.api import parse_job
from rlhf_operator.builders import BuildSettings, build_config_map, build_gang
from rlhf_operator.chain import PeerJob, Source
from rlhf_operator.planner import AddOwner, CreateObject, DeleteJob, EmitEvent, Observed

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = BuildSettings()


def ppo_job(status=None, name="ppo", **spec):
    """A StackLLaMA-style PPO job: policy from `sft`, reward model and critic from `rm`."""
    body = {
        "algorithm": "ppo", "image": "trainer:1",
        "model": {"fromJob": "sft"}, "rewardModel": {"fromJob": "rm"}, "critic": {"model": "reward"},
        "dataset": {"path": "synthetic://arithmetic"},
        "roles": [{"name": "actor"}, {"name": "critic"}, {"name": "reward", "colocateWith": "critic"},
                  {"name": "reference", "colocateWith": "actor"}],
    }
    body.update(spec)
    return parse_job({"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"}, "spec": body,
                      "status": copy.deepcopy(status or {})})


def peer(name, phase="Succeeded", algorithm=None, from_jobs=(), owned=False, failure=""):
    algorithm = algorithm or ("rm" if name.startswith("rm") else "sft")
    return PeerJob(name, f"uid-{name}", phase, algorithm, claim=f"{name}-checkpoints", claim_owned=owned,
                   from_jobs=tuple(from_jobs), failure=failure)


SFT_OK, RM_OK = peer("sft"), peer("rm", from_jobs=("sft",))
READY_STATUS = {"phase": "Running", "sources": [{"name": "sft", "uid": "uid-sft", "claim": "sft-checkpoints"},
                                                 {"name": "rm", "uid": "uid-rm", "claim": "rm-checkpoints"}],
                "conditions": [{"type": "SourcesReady", "status": "True", "reason": "SourcesSucceeded"}]}


@dataclass
class GateCase:
    peers: tuple[PeerJob, ...]
    state: str
    reason: str = ""
    message_has: tuple[str, ...] = ()
    waiting_for: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    status: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)


GATE_CASES = {
    "no-from-job-is-no-gate": GateCase((), "none", spec={"model": {"path": "tiny://llama"},
                                                           "rewardModel": {"path": "tiny://llama"}}),
    "waiting-for-a-running-source": GateCase(
        (peer("sft", "Running"), peer("rm", "Pending", from_jobs=("sft",))), "waiting", chain.WAITING,
        ("sft (Running)", "rm (Pending)"), ("sft", "rm")),
    "waiting-for-one-of-two": GateCase((SFT_OK, peer("rm", "Running", from_jobs=("sft",))), "waiting",
                                       chain.WAITING, ("RLHFJob rm (Running)",), ("rm",)),
    "waiting-for-a-source-not-created-yet": GateCase((SFT_OK,), "waiting", chain.WAITING, ("rm (not found)",),
                                                     ("rm",)),
    "waiting-for-a-source-never-reconciled": GateCase((SFT_OK, peer("rm", "")), "waiting", chain.WAITING,
                                                      ("rm (new)",), ("rm",)),
    "sources-succeeded": GateCase((SFT_OK, RM_OK), "ready", chain.SUCCEEDED),
    "sources-succeeded-owned-claim-is-protected": GateCase(
        (peer("sft", owned=True), RM_OK), "ready", chain.SUCCEEDED, protect=("sft-checkpoints",)),
    "source-failed": GateCase((peer("sft", "Failed", failure="ReachedMaxRestarts: the gang failed"), RM_OK),
                              "failed", chain.SOURCE_FAILED,
                              ("spec.model.fromJob: RLHFJob sft failed", "ReachedMaxRestarts: the gang failed")),
    "source-failed-while-another-still-runs": GateCase(
        (peer("sft", "Running"), peer("rm", "Failed", from_jobs=("sft",))), "failed", chain.SOURCE_FAILED,
        ("spec.rewardModel.fromJob: RLHFJob rm failed",)),
    "source-deleted-before-the-job-started-waits": GateCase((RM_OK,), "waiting", chain.WAITING,
                                                            ("sft (not found)",), ("sft",)),
    "source-deleted-after-the-job-started-changes-nothing": GateCase((), "ready", chain.SUCCEEDED,
                                                                     status=READY_STATUS),
    "source-failed-after-the-job-started-changes-nothing": GateCase(
        (peer("sft", "Failed"), RM_OK), "ready", chain.SUCCEEDED, status=READY_STATUS),
    "reward-model-from-a-policy-job": GateCase((SFT_OK, peer("rm", algorithm="dpo")), "failed",
                                               chain.SOURCE_MISMATCH,
                                               ("rewardModel.fromJob names RLHFJob rm (algorithm dpo)",
                                                "needs a reward or prm model")),
    "policy-from-a-reward-model-job": GateCase((peer("sft", algorithm="rm"), RM_OK), "failed",
                                               chain.SOURCE_MISMATCH, ("model needs a policy model",)),
    "mismatch-is-told-before-the-source-finishes": GateCase(
        (peer("sft", "Running", algorithm="rm"), RM_OK), "failed", chain.SOURCE_MISMATCH),
    "two-job-cycle": GateCase((SFT_OK, peer("rm", "Pending", from_jobs=("ppo",))), "failed", chain.SOURCE_CYCLE,
                              ("ppo -> rm -> ppo",)),
    "three-job-cycle": GateCase((peer("sft", "Pending", from_jobs=("rm",)), peer("rm", "Pending", from_jobs=("x",)),
                                 peer("x", "Pending", algorithm="sft", from_jobs=("ppo",))),
                                "failed", chain.SOURCE_CYCLE, ("ppo -> sft -> rm -> x -> ppo",)),
    "downstream-of-a-cycle-waits-for-it": GateCase(
        (peer("sft", "Pending", from_jobs=("loop",)), peer("loop", "Pending", algorithm="sft", from_jobs=("sft",)),
         RM_OK), "waiting", chain.WAITING, waiting_for=("sft",)),
}


@pytest.mark.parametrize("name", GATE_CASES)
def test_gate(name):
    case = GATE_CASES[name]
    job = ppo_job(case.status, **case.spec)
    gate = chain.gate(job, {p.name: p for p in case.peers})
    assert gate.state == case.state
    assert gate.reason == case.reason
    for fragment in case.message_has:
        assert fragment in gate.message
    if case.state == "waiting":
        assert gate.waiting_for == case.waiting_for
    if case.state == "ready":
        assert [s.name for s in gate.sources] == ["sft", "rm"]
        assert gate.protect == case.protect


def test_ready_sources_carry_the_source_uids_and_claims():
    gate = chain.gate(ppo_job(), {"sft": SFT_OK, "rm": RM_OK})
    assert gate.sources == (Source("sft", "uid-sft", "sft-checkpoints"), Source("rm", "uid-rm", "rm-checkpoints"))


@pytest.mark.parametrize(("edges", "cycle"), [
    pytest.param({"a": ("b",), "b": ("c",), "c": ()}, None, id="chain"),
    pytest.param({"a": ("b", "c"), "b": ("c",), "c": ()}, None, id="diamond"),
    pytest.param({"a": ("b",), "b": ("a",)}, ["a", "b", "a"], id="pair"),
    pytest.param({"a": ("b",), "b": ("c",), "c": ("b",)}, None, id="cycle-downstream-only"),
    pytest.param({"a": ("x", "b"), "b": ("c",), "c": ("a",), "x": ()}, ["a", "b", "c", "a"], id="second-branch"),
    pytest.param({"a": ("missing",)}, None, id="unknown-source"),
])
def test_find_cycle(edges, cycle):
    assert chain.find_cycle("a", edges) == cycle


def test_peer_of_reads_claims_and_the_failure():
    owned = ppo_job(name="p", checkpoint={"volume": {"retain": False}})
    shared = ppo_job(name="q", checkpoint={"volume": {"existingClaim": "team-models"}})
    status = {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": "PermanentError",
                                                 "message": "exit 78"}]}
    p = chain.peer_of("p", "u", owned.spec, status)
    assert (p.claim, p.claim_owned, p.from_jobs, p.failure) == ("p-checkpoints", True, ("sft", "rm"),
                                                              "PermanentError: exit 78")
    assert (chain.peer_of("q", "u", shared.spec, {}).claim, chain.peer_of("q", "u", shared.spec, {}).claim_owned) \
        == ("team-models", False)
    retained = chain.peer_of("r", "u", ppo_job(name="r").spec, {})  # retain: true is the default
    assert not retained.claim_owned
    assert chain.peer_of("bad", "u", None, status).phase == "Failed"


def test_related_peers_are_the_sources_transitively_and_the_dependants():
    every = {p.name: p for p in (peer("base"), peer("sft", from_jobs=("base",)), peer("rm", from_jobs=("sft",)),
                                 peer("other"), peer("eval", from_jobs=("ppo",)))}
    assert set(chain.related_peers("ppo", ("sft", "rm"), every)) == {"base", "sft", "rm", "eval"}


def test_dependants_are_the_unfinished_jobs_naming_the_job():
    every = {p.name: p for p in (peer("rm", "Running", from_jobs=("sft",)), peer("ppo", "Succeeded", from_jobs=("sft",)),
                                 peer("dpo", "", from_jobs=("sft",)), peer("x", "Running"))}
    assert chain.dependants("sft", every) == ("dpo", "rm")


# --- the planner around the gate -------------------------------------------------------------------


def plan(job, peers=(), at=0.0, **observed):
    return planner.plan(job, Observed(peers={p.name: p for p in peers}, **observed), T0 + timedelta(seconds=at),
                        SETTINGS)


def test_a_waiting_job_stays_pending_creates_nothing_and_says_what_it_waits_for():
    result = plan(ppo_job(), [peer("sft", "Running")])
    assert result.status["phase"] == "Pending"
    assert result.status["waitingFor"] == "sft, rm"
    assert not [a for a in result.actions if isinstance(a, CreateObject)]
    cond = planner.get_condition(result.status, "SourcesReady")
    assert (cond["status"], cond["reason"]) == ("False", "WaitingForSource")
    assert "sft (Running), rm (not found)" in cond["message"]
    assert [a.reason for a in result.actions if isinstance(a, EmitEvent)] == ["WaitingForSource"]
    again = plan(ppo_job(result.status), [peer("sft", "Running")], at=5)
    assert not again.actions  # the same wait: no second event
    assert again.status == {**result.status, "roles": again.status["roles"]}
    moved = plan(ppo_job(result.status), [peer("sft", "Succeeded"), peer("rm", "Running")], at=9)
    assert [a.reason for a in moved.actions] == ["WaitingForSource"]  # now it waits for rm only
    assert moved.status["waitingFor"] == "rm"
    assert "rm (Running)" in planner.get_condition(moved.status, "SourcesReady")["message"]
    quiet = plan(ppo_job(moved.status), [peer("sft", "Succeeded"), peer("rm", "Restarting")], at=12)
    assert not quiet.actions  # a source's phase changed, not what the job waits for


def test_once_the_sources_succeeded_the_gang_mounts_their_exports_read_only():
    result = plan(ppo_job(), [SFT_OK, RM_OK])
    assert "waitingFor" not in result.status
    assert result.status["sources"] == READY_STATUS["sources"]
    assert planner.condition_is_true(result.status, "SourcesReady")
    pods = [a.obj for a in result.actions if isinstance(a, CreateObject) and a.obj["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in pods] == ["ppo-actor-0", "ppo-critic-0"]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["source-sft"]["persistentVolumeClaim"] == {"claimName": "sft-checkpoints", "readOnly": True}
        mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/sources/rm"] == {"name": "source-rm", "mountPath": "/sources/rm", "subPath": "export",
                                         "readOnly": True}
    assert not [a for a in result.actions if isinstance(a, AddOwner)]  # retained claims need no co-owner


def test_a_source_claim_that_goes_with_its_job_gets_the_dependant_as_a_second_owner_once():
    peers = [peer("sft", owned=True), RM_OK]
    first = plan(ppo_job(), peers)
    [add] = [a for a in first.actions if isinstance(a, AddOwner)]
    assert (add.kind, add.name) == ("PersistentVolumeClaim", "sft-checkpoints")
    assert dict(add.owner) == {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "name": "ppo", "uid": "uid-ppo",
                               "controller": False, "blockOwnerDeletion": False}
    later = plan(ppo_job(first.status), peers, at=1)
    assert not [a for a in later.actions if isinstance(a, AddOwner)]


def test_a_gang_restart_after_the_source_was_deleted_mounts_the_recorded_claims():
    status = {**READY_STATUS, "phase": "Restarting", "restarts": 1}
    result = plan(ppo_job(status), [], at=60, existing=frozenset(
        {("Service", "ppo"), ("ConfigMap", "ppo-config"), ("PersistentVolumeClaim", "ppo-checkpoints")}))
    pods = [a.obj for a in result.actions if isinstance(a, CreateObject) and a.obj["kind"] == "Pod"]
    assert pods and all({"source-sft", "source-rm"} <= {v["name"] for v in p["spec"]["volumes"]} for p in pods)


def test_a_failed_source_fails_the_dependant_naming_the_source():
    result = plan(ppo_job(), [peer("sft", "Failed", failure="PermanentError: bad data"), RM_OK])
    assert result.status["phase"] == "Failed"
    failed = planner.get_condition(result.status, "Failed")
    assert failed["reason"] == "SourceFailed" and "RLHFJob sft failed" in failed["message"]
    assert "bad data" in failed["message"]
    assert not [a for a in result.actions if isinstance(a, CreateObject)]


def test_a_cycle_fails_the_job():
    result = plan(ppo_job(), [peer("sft", "Pending", from_jobs=("ppo",)), RM_OK])
    assert result.status["phase"] == "Failed"
    assert planner.get_condition(result.status, "Failed")["reason"] == "SourceCycle"


def test_suspend_wins_over_waiting():
    result = plan(ppo_job(suspend=True), [])
    assert result.status["phase"] == "Suspended" and "waitingFor" not in result.status


def test_ttl_waits_for_the_jobs_that_still_need_the_source():
    done = {"phase": "Succeeded", "completionTime": planner.format_time(T0)}
    sft = parse_job({"metadata": {"name": "sft", "namespace": "ns", "uid": "uid-sft"}, "status": done,
                     "spec": {"algorithm": "sft", "image": "t", "model": {"path": "tiny://llama"},
                              "dataset": {"path": "synthetic://instructions"}, "roles": [{"name": "actor"}],
                              "ttlSecondsAfterFinished": 60}})
    needing = [peer("ppo", "Pending", algorithm="ppo", from_jobs=("sft", "rm"))]
    assert not [a for a in plan(sft, needing, at=120).actions if isinstance(a, DeleteJob)]
    finished = [peer("ppo", "Succeeded", algorithm="ppo", from_jobs=("sft", "rm"))]
    assert [a for a in plan(sft, finished, at=120).actions if isinstance(a, DeleteJob)]


# --- the trainer config ----------------------------------------------------------------------------


def test_the_trainer_config_names_the_mounted_exports():
    text = build_config_map(ppo_job())["data"]["config.json"]
    cfg = parse_config(json.loads(text))
    assert (cfg.model.path, cfg.reward_model.path, cfg.critic.model) == ("/sources/sft", "/sources/rm", "reward")


def test_a_job_without_sources_mounts_none():
    job = ppo_job(model={"path": "tiny://llama"}, rewardModel={"path": "/models/rm"})
    names = {v["name"] for p in build_gang(job, 0, SETTINGS) for v in p["spec"]["volumes"]}
    assert not [n for n in names if n.startswith("source-")]
