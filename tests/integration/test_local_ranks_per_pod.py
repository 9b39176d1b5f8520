"""Two pods x two trainer processes per role (processesPerPod: 2, gloo on CPU) through the local runner
and the real trainer: PPO (actor and critic 2 x 2, reference colocated) and DPO (actor and reference
2 x 2) reach Succeeded with every step's checkpoint COMPLETE and one metrics file per global rank, then
a second run of the same manifest with more steps resumes every rank from the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rlhf_operator import local
from rlhf_trainer import checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 900
TWO_BY_TWO = {"replicas": 2, "processesPerPod": 2}

CASES = {
    # name: (example, {role: overrides}, roles with pods of their own)
    "ppo: actor and critic 2 pods x 2 processes, reference in the actor's": (
        "ppo-tiny.yaml", {"actor": TWO_BY_TWO, "critic": TWO_BY_TWO, "reference": {"colocateWith": "actor"}},
        ("actor", "critic")),
    "dpo: actor and reference 2 pods x 2 processes": (
        "dpo-tiny.yaml", {"actor": TWO_BY_TWO, "reference": TWO_BY_TWO}, ("actor", "reference")),
}


def manifest(example: str, roles: dict, max_steps: int) -> dict:
    obj = yaml.safe_load((REPO / "crds" / "examples" / example).read_text())
    for role in obj["spec"]["roles"]:
        role.update(roles.get(role["name"], {}))
        if role.get("colocateWith"):
            role.pop("resources", None)
    obj["spec"]["hyperparameters"].update(maxSteps=max_steps, batchSize=8, microBatchSize=2)
    obj["spec"]["checkpoint"].update(intervalSteps=1, keep=3)
    obj["spec"]["failurePolicy"] = {"maxRestarts": 0, "backoffSeconds": 1}  # a restart would hide a failure
    return obj


def logs(runner) -> str:
    return "\n".join(f"== {p.parent.name}\n{p.read_text()[-3000:]}" for p in sorted(runner.run_dir.glob("pods/*/log.txt")))


def metrics(run_dir: Path, role: str, rank: int) -> list[dict]:
    path = run_dir / "checkpoints" / "metrics" / f"{role}-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("name", CASES)
def test_two_pods_of_two_processes_succeed_checkpoint_and_resume(name, tmp_path):
    example, roles, pod_roles = CASES[name]
    first = local.LocalRunner(manifest(example, roles, max_steps=2), tmp_path, serve_metrics=False)
    status = first.run(timeout=RUN_TIMEOUT)
    assert status["phase"] == "Succeeded", logs(first)
    assert status.get("restarts", 0) == 0
    # Two pods per role with pods, each started once: the processes come from the pods' entry points.
    assert len(first.timeline.times("pod_started")) == 2 * len(pod_roles)
    ckpt = first.run_dir / "checkpoints"
    assert [s for s in (1, 2) if checkpoint.is_complete(ckpt, s)] == [1, 2]
    # One metrics file per actor rank 0..3 (the serving roles write none), named by the global rank.
    assert {p.stem for p in (ckpt / "metrics").glob("actor-*.jsonl")} == {f"actor-{r}" for r in range(4)}
    actor = [metrics(first.run_dir, "actor", r) for r in range(4)]
    # Training steps 1 and 2 on every rank (the row of step 0 is the held-out evaluation before training).
    assert all([row["step"] for row in rows if "loss" in row] == [1, 2] for rows in actor)
    assert (ckpt / "export" / "config.json").exists()

    second = local.LocalRunner(manifest(example, roles, max_steps=3), tmp_path, serve_metrics=False)
    status = second.run(timeout=RUN_TIMEOUT)
    assert status["phase"] == "Succeeded", logs(second)
    text = logs(second)
    for role in pod_roles:  # every process of every role resumed from step 2
        assert sum(f"{role}-{r}: resumed from step 2" in text for r in range(4)) == 4, text
    assert [row["step"] for row in metrics(second.run_dir, "actor", 3) if "loss" in row] == [1, 2, 3]
    assert checkpoint.is_complete(ckpt, 3)
