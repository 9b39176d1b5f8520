"""dataset.eval_path is read and evaluated (algorithms/evaluation.py): before the first step (step 0)
and at the last, for every algorithm, with the metrics each one promises."""

from __future__ import annotations

import json

import pytest
from rlhf_contract.algorithms import required_roles
from trainer_harness import trainer_config
from trainer_inprocess import colocated_roles, in_process_context, role_world, run_actor  # noqa: F401

EVAL = {
    "ppo": ("synthetic://arithmetic?size=8&seed=1", {"eval_reward_mean", "eval_reward_mean_sampled", "eval_pass_rate"}),
    "grpo": ("synthetic://arithmetic?size=8&seed=1", {"eval_reward_mean", "eval_reward_mean_sampled", "eval_pass_rate"}),
    "dpo": ("synthetic://preferences?size=8&seed=1", {"eval_preference_accuracy", "eval_loss"}),
    "rm": ("synthetic://preferences?size=8&seed=1", {"eval_preference_accuracy", "eval_loss"}),
    "sft": ("synthetic://instructions?size=8&seed=1", {"eval_loss", "eval_exact_match"}),
}
SHARES = {"eval_pass_rate", "eval_preference_accuracy", "eval_exact_match"}


@pytest.mark.parametrize("algorithm", EVAL)
def test_eval_runs_at_step_0_and_at_the_end(role_world, tmp_path, algorithm):  # noqa: F811
    path, names = EVAL[algorithm]
    config = trainer_config(algorithm, roles=colocated_roles(required_roles(algorithm, "rule")),
                            checkpoint={"interval_steps": 100, "keep": 1},
                            hyperparameters={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4})
    config["dataset"]["eval_path"] = path
    ctx = in_process_context(config, tmp_path)
    run_actor(ctx)
    assert len(ctx.eval_records) == 8
    rows = {r["step"]: r for r in map(json.loads, open(ctx.metrics.jsonl_path))}
    assert sorted(rows) == [0, 1, 2]
    for step in (0, 2):
        got = {k for k in rows[step] if k.startswith("eval_")}
        assert got == names, (step, got)
        for name in names & SHARES:
            assert 0.0 <= rows[step][name] <= 1.0
    assert not any(k.startswith("eval_") for k in rows[1])  # step 1 is neither a checkpoint nor the last
    assert rows[2]["eval_loss" if "eval_loss" in names else "eval_reward_mean"] is not None
    assert ctx.metrics.registry.get_sample_value("rlhf_trainer_phase_seconds_count", {"phase": "eval"}) == 2.0


def test_a_bad_eval_file_fails_before_training_naming_file_and_line(role_world, tmp_path):  # noqa: F811
    from rlhf_trainer.errors import DataError

    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": 5}\n')
    config = trainer_config("dpo", roles=colocated_roles(("actor", "reference")))
    config["dataset"] = {"path": "synthetic://preferences", "format": "pairs", "eval_path": str(bad)}
    with pytest.raises(DataError, match="eval.jsonl:2"):
        run_actor(in_process_context(config, tmp_path))
