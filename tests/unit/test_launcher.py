"""Several trainer processes per pod (roles[].processesPerPod): ranks from the env, the pod's entry
point (rlhf_trainer.launcher) as a table of exit codes and as real processes, and the layout rules."""

from __future__ import annotations

import sys
import time

import pytest
from rlhf_contract import layout, wire
from rlhf_trainer import launcher
from rlhf_trainer.__main__ import launches
from rlhf_trainer.distributed import read_process_env


def pod_env(pod=1, pods=2, per_pod=4, **extra):
    return {
        wire.ENV_ROLE: "critic", wire.ENV_ROLE_RANK: str(pod), wire.ENV_ROLE_REPLICAS: str(pods),
        wire.ENV_PROCESSES_PER_POD: str(per_pod), wire.ENV_CONFIG: "/etc/rlhf/config.json",
        wire.ENV_CHECKPOINT_DIR: "/ckpt", wire.ENV_ROLE_ADDRS: "actor=a:29500,critic=c:29500",
        wire.ENV_METRICS_PORT: "9400", **extra,
    }


def test_each_local_process_gets_its_rank_in_the_role_world_and_torchrun_names():
    env = launcher.child_env(pod_env(), 3)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("7", "3", "8", "4")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("c", "29500")  # the role's rank 0
    process = read_process_env(env)
    assert (process.rank, process.world_size, process.local_rank, process.pod_index, process.pods) == (7, 8, 3, 1, 2)
    assert process.metrics_port == 9403  # 9400 + local rank: one /metrics per process


def test_one_process_per_pod_keeps_the_pod_index_as_the_rank():
    process = read_process_env(pod_env(pod=1, per_pod=1))
    assert (process.rank, process.world_size, process.metrics_port) == (1, 2, 9400)
    assert read_process_env(pod_env(per_pod=4, **{wire.ENV_METRICS_PORT: "0", wire.ENV_LOCAL_RANK: "2"})).metrics_port == 0


@pytest.mark.parametrize("extra, words", [
    ({wire.ENV_LOCAL_RANK: "4"}, "RLHF_LOCAL_RANK: 4 is not in 0..3"),
    ({wire.ENV_PROCESSES_PER_POD: "0"}, "RLHF_PROCESSES_PER_POD: must be at least 1"),
    ({wire.ENV_PROCESSES_PER_POD: "two"}, "RLHF_PROCESSES_PER_POD: expected an integer"),
])
def test_bad_process_env_names_the_variable(extra, words):
    with pytest.raises(ValueError, match=words):
        read_process_env(pod_env(**extra))


def test_the_entry_point_launches_only_in_a_pod_of_several_processes():
    assert launches(pod_env(per_pod=4))
    assert not launches(pod_env(per_pod=1))
    assert not launches({k: v for k, v in pod_env().items() if k != wire.ENV_PROCESSES_PER_POD})
    assert not launches(launcher.child_env(pod_env(), 0))  # a started process runs the trainer itself


EXIT_CODES = {
    # name: (exit codes in the order the processes exited, the pod's exit code)
    "all done": ([0, 0, 0, 0], 0),
    "one crashed, the others killed after it: the crash's code": ([1, -9, -9, -9], 1),
    "killed by the OOM killer: 137, retryable": ([-9, -9], 137),
    "a permanent error wins over the crashes it caused": ([-9, 78, -9], 78),
    "bad data": ([0, 65], 65),
    "told to stop: 143": ([143, 143, 0], 143),
}


@pytest.mark.parametrize("name", EXIT_CODES)
def test_pod_exit_code(name):
    codes, expected = EXIT_CODES[name]
    assert launcher.pod_exit_code(codes) == expected


CHILD = """
import os, sys, time
rank = int(os.environ["RLHF_LOCAL_RANK"])
codes = [int(c) for c in os.environ["CODES"].split(",")]
if codes[rank] < 0:
    time.sleep(60)  # runs until the launcher kills it
time.sleep(0.2 * rank)
sys.exit(codes[rank])
"""


@pytest.mark.parametrize("codes, expected", [
    ("0,0,0", 0),
    ("-1,3,-1", 3),  # rank 1 fails: the two that would run for a minute are killed
    ("-1,-1,78", 78),
])
def test_run_pod_waits_for_all_and_stops_the_rest_when_one_fails(codes, expected):
    start = time.monotonic()
    code = launcher.run_pod([sys.executable, "-c", CHILD], {**pod_env(per_pod=3), "CODES": codes}, 3)
    assert code == expected
    assert time.monotonic() - start < 30  # nobody waited for the sleepers


# ---- the layout in ranks ------------------------------------------------------------------------


def test_bridge_and_serving_ranks_count_processes():
    placements = {"actor": layout.Placement(2, "", 2), "critic": layout.Placement(1, "", 2),
                  "reference": layout.Placement(1, "actor")}
    ranks = layout.bridge_ranks(placements)
    assert ranks == {("actor", 0): 0, ("actor", 1): 1, ("actor", 2): 2, ("actor", 3): 3,
                     ("critic", 0): 4, ("critic", 1): 5}
    assert [layout.serving_rank("critic", a, placements) for a in range(4)] == [("critic", r) for r in (0, 1, 0, 1)]
    assert layout.served_actor_ranks("critic", 1, placements) == [1, 3]
    assert layout.serving_rank("reference", 3, placements) == ("actor", 3)


def test_layout_rules_compare_ranks_and_say_so():
    actor = layout.Placement(2, "", 2)
    assert layout.batch_problem(actor, 8) is None
    assert "actor's ranks (replicas x processesPerPod: 2 x 2 = 4)" in layout.batch_problem(actor, 6)
    problems = layout.replica_problems([("actor", actor), ("critic", layout.Placement(1, "", 8))])
    assert problems == [(1, "processes_per_pod", "must be at most the actor's ranks (replicas x processesPerPod: 2 x 2 = 4): each rank "
                            "of a role with pods serves actor ranks (got 1 x 8 = 8)")]
    assert layout.replica_problems([("actor", actor), ("critic", layout.Placement(4, "", 1))]) == []
    assert [f for _, f, _ in layout.replica_problems([("actor", actor), ("critic", layout.Placement(5, "", 1))])] \
        == ["replicas"]  # its pods alone outnumber the actor's ranks
