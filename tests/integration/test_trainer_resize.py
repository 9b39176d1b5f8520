"""A job resumed by another number of actor ranks than saved its checkpoint (issue 18, part 4).

DeepSpeed refuses a ZeRO checkpoint saved by another data-parallel world ("DP world size of 1 but the
current world size is 2"), which used to be a retryable crash until maxRestarts. Now the trainer reshards
it through DeepSpeed's universal checkpoint; where that fails, it exits 78 (permanent) naming the saved
and the current world size. The user's report is tests/integration/cases/resize/ (two manifests on one
work folder).
"""

import json
from pathlib import Path

import pytest
import yaml
from rlhf_contract import wire
from rlhf_operator import local, report
from rlhf_trainer import checkpoint
from trainer_harness import launch, trainer_config

pytestmark = pytest.mark.slow
CASES = Path(__file__).resolve().parent / "cases" / "resize"


def dpo(actor_replicas: int, max_steps: int) -> dict:
    roles = {"actor": {"replicas": actor_replicas}, "reference": {"replicas": 1, "colocate_with": "actor"}}
    return trainer_config("dpo", roles=roles, hyperparameters={"max_steps": max_steps},
                          checkpoint={"interval_steps": 2, "keep": 3})


def test_a_checkpoint_that_cannot_be_resharded_is_a_permanent_error_naming_both_world_sizes(tmp_path):
    first = launch(dpo(1, 2), tmp_path / "one")
    assert first.ok, first.describe()
    # A universal folder that holds nothing (as if a conversion had produced garbage): DeepSpeed cannot load it.
    (checkpoint.step_dir(first.checkpoint_dir, 2) / "actor" / checkpoint.UNIVERSAL).mkdir()
    second = launch(dpo(2, 4), tmp_path / "two", checkpoint_dir=first.checkpoint_dir, restart_attempt=1,
                    kill_on_failure=False)
    assert second.returncodes == {"actor-0": wire.EXIT_CONFIG_ERROR, "actor-1": wire.EXIT_CONFIG_ERROR}, \
        second.describe()
    message = second.termination["actor-0"]
    assert "checkpoint step-2 of role actor was saved by a data-parallel world of 1" in message
    assert "this job runs 2" in message and "Resume with 1 actor ranks (replicas x processesPerPod)" in message


def test_a_zero_stage_the_universal_checkpoint_cannot_reach_is_refused_before_converting(tmp_path):
    """Saved at ZeRO-2, resumed at ZeRO-3 (the user's try): DeepSpeed's universal checkpoint cannot move the
    optimizer between them, so the trainer exits 78 at once naming both stages and the stage that resumes."""
    roles = {"actor": {"replicas": 1, "deepspeed": {"zero_stage": 2}}, "reference": {"colocate_with": "actor"}}
    first = launch(trainer_config("dpo", roles=roles, hyperparameters={"max_steps": 2},
                                  checkpoint={"interval_steps": 2}), tmp_path / "one")
    assert first.ok, first.describe()
    roles["actor"]["deepspeed"]["zero_stage"] = 3
    second = launch(trainer_config("dpo", roles=roles, hyperparameters={"max_steps": 4}), tmp_path / "two",
                    checkpoint_dir=first.checkpoint_dir, restart_attempt=1, kill_on_failure=False)
    assert second.returncodes == {"actor-0": wire.EXIT_CONFIG_ERROR}, second.describe()
    message = second.termination["actor-0"]
    assert "(ZeRO stage 2) and this job runs 1 (ZeRO stage 3)" in message
    assert "Resume with deepspeed.zeroStage 2 on the actor" in message
    assert not (checkpoint.step_dir(first.checkpoint_dir, 2) / "actor" / checkpoint.UNIVERSAL).exists()


def test_the_users_resize_case_resumes_on_two_ranks_and_succeeds(tmp_path):
    """The two manifests of the report, run one after the other on the same work folder."""
    for name, steps in (("job-1rank-2steps.yaml", 2), ("job-6steps-2ranks.yaml", 6)):
        runner = local.LocalRunner(yaml.safe_load((CASES / name).read_text()), tmp_path, serve_metrics=False)
        status = runner.run(timeout=900)
        logs = "\n".join(p.read_text()[-2500:] for p in sorted(runner.run_dir.glob("pods/*/log.txt")))
        assert status["phase"] == "Succeeded", (name, status, logs)
        assert status["restarts"] == 0, logs
        assert status["progress"]["step"] == steps
    for pod in ("dpo-resume-actor-0", "dpo-resume-actor-1"):
        assert "resumed from step 2" in (runner.run_dir / "pods" / pod / "log.txt").read_text()
    ckpt = runner.checkpoint_dir
    # resharded through DeepSpeed's universal checkpoint, once; the new world saved its own layout
    assert (checkpoint.step_dir(ckpt, 2) / "actor" / checkpoint.UNIVERSAL / "latest_universal").is_file()
    assert checkpoint.select_resume_step(ckpt, ["actor", "reference"]) == 6
    assert checkpoint.saved_world_size(checkpoint.step_dir(ckpt, 6) / "actor") == 2
    rows = [json.loads(line) for line in (ckpt / "metrics" / "actor-0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # the resume redid no step, yet the file says where it resumed and `rlhf-operator report` counts it
    assert [r.get("resumed_from") for r in rows] == [None, None, 2.0, None, None, None]
    assert report.history(rows).restarts == 1
