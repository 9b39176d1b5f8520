"""The kube shell's side of `fromJob` (rlhf_operator.chain): which jobs a pass sees as peers, which jobs a
job's phase change wakes, and the co-owner patch of a source's claim."""

from __future__ import annotations

import pytest
from rlhf_operator import api, planner
from rlhf_operator.builders import BuildSettings
from rlhf_operator.kube.reconciler import Controller, JobRecord, _Writes
from rlhf_operator.metrics import OperatorMetrics

NS = "ns"


def controller() -> Controller:
    return Controller(api=None, settings=BuildSettings(), metrics=OperatorMetrics(), pods={}, children={})


def job_body(name: str, phase: str = "", rv: str = "1", **spec) -> dict:
    body = {"algorithm": "sft", "image": "t", "model": {"path": "tiny://llama"},
            "dataset": {"path": "synthetic://instructions"}, "roles": [{"name": "actor"}]}
    body.update(spec)
    return {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "spec": body,
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1, "resourceVersion": rv},
            "status": {"phase": phase} if phase else {}}


def queued(c: Controller) -> set[str]:
    """Names of the jobs waiting for a pass (the work queue's set of queued keys)."""
    return {key[1] for key in c.queue._queued}


def add(c: Controller, body: dict) -> None:
    c.job_changed((NS, body["metadata"]["name"]), body, "ADDED")


@pytest.fixture
def chain_controller():
    """sft <- rm <- ppo (ppo names sft and rm), and an unrelated job, all seen; the queue emptied."""
    c = controller()
    add(c, job_body("sft", "Running"))
    add(c, job_body("rm", "Pending", model={"fromJob": "sft"}, algorithm="rm",
                    dataset={"path": "synthetic://preferences"}))
    add(c, job_body("ppo", "Pending", model={"fromJob": "sft"}))
    add(c, job_body("other", "Running"))
    c.queue = type(c.queue)()
    return c


def test_a_source_changing_phase_wakes_the_jobs_naming_it(chain_controller):
    c = chain_controller
    c.job_changed((NS, "sft"), job_body("sft", "Succeeded", rv="2"), "MODIFIED")
    assert queued(c) == {"sft", "rm", "ppo"}


def test_a_dependant_changing_phase_wakes_its_source_for_the_ttl(chain_controller):
    c = chain_controller
    c.job_changed((NS, "rm"), job_body("rm", "Succeeded", rv="2", model={"fromJob": "sft"}, algorithm="rm",
                                       dataset={"path": "synthetic://preferences"}), "MODIFIED")
    assert queued(c) == {"rm", "sft"}


def test_a_status_write_without_a_phase_change_wakes_nobody_else(chain_controller):
    c = chain_controller
    c.job_changed((NS, "sft"), job_body("sft", "Running", rv="2"), "MODIFIED")
    assert queued(c) == {"sft"}


def test_a_deleted_source_wakes_its_dependants(chain_controller):
    c = chain_controller
    c.forget((NS, "sft"))
    assert queued(c) == {"rm", "ppo"}
    assert (NS, "sft") not in c.records


def test_peers_are_the_sources_and_dependants_with_the_latest_status(chain_controller):
    c = chain_controller
    rm = api.parse_job(job_body("rm", "Pending", model={"fromJob": "sft"}, algorithm="rm",
                                dataset={"path": "synthetic://preferences"}))
    c.records[(NS, "sft")].written = ("1", {"phase": "Succeeded"})  # our write, not in the index yet
    peers = c.peers_of((NS, "rm"), rm)
    assert set(peers) == {"sft"}
    assert peers["sft"].phase == "Succeeded" and peers["sft"].claim == "sft-checkpoints"
    sft = api.parse_job({**job_body("sft", "Succeeded", ttlSecondsAfterFinished=60)})
    assert set(c.peers_of((NS, "sft"), sft)) == {"rm", "ppo"}  # a finished source with a TTL: its dependants


def test_a_job_outside_any_chain_builds_no_peers(chain_controller):
    c = chain_controller
    assert c.peers_of((NS, "other"), api.parse_job(job_body("other", "Running"))) == {}


def test_the_co_owner_patch_is_staged_for_the_claim():
    class OwnerApi:
        def add_owner(self, api_version, kind, namespace, name, owner):
            return ("add_owner", api_version, kind, namespace, name, owner)

    c = controller()
    c.api = OwnerApi()
    staged = _Writes()
    owner = (("apiVersion", "rlhf.dev/v1alpha1"), ("kind", "RLHFJob"), ("name", "ppo"), ("uid", "u"),
             ("controller", False), ("blockOwnerDeletion", False))
    c._stage(planner.AddOwner("PersistentVolumeClaim", "sft-checkpoints", owner), staged, JobRecord(), NS, 0.0)
    assert staged.writes == [("add_owner", "v1", "PersistentVolumeClaim", NS, "sft-checkpoints", dict(owner))]
