"""Samples (rlhf_trainer.samples) from the real online loops: the file on the checkpoint volume and
the info series the operator turns into status.progress.lastSample."""

import json

import pytest
from rlhf_contract.algorithms import required_roles
from trainer_harness import trainer_config
from trainer_inprocess import colocated_roles, in_process_context, role_world, run_actor  # noqa: F401


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_every_interval_the_first_rollouts_are_written(role_world, tmp_path, algorithm):  # noqa: F811
    config = trainer_config(algorithm, roles=colocated_roles(required_roles(algorithm, "rule")),
                            checkpoint={"interval_steps": 100, "keep": 1},
                            hyperparameters={"max_steps": 4, "batch_size": 4, "micro_batch_size": 4,
                                             "max_new_tokens": 3, "sample_interval_steps": 2,
                                             "samples_per_step": 3})
    ctx = in_process_context(config, tmp_path)
    run_actor(ctx)
    path = tmp_path / "checkpoints" / "samples" / "actor-0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4]
    prompts = {r.prompt for r in ctx.eval_records} | {f"{a}+{b}=" for a in range(5) for b in range(5)}
    for r in rows:
        assert r["prompt"] in prompts and isinstance(r["response"], str)
        assert 1 <= r["length"] <= 3 and (not r["truncated"] or r["length"] == 3)
        assert min(abs(r["reward"] - v) for v in (0.0, 0.1, 1.0)) < 1e-6  # exact_match scores
        assert isinstance(r["kl"], float)
    info = ctx.metrics.registry.get_sample_value("rlhf_trainer_sample_info", {
        k: str(v).lower() if isinstance(v, bool) else (f"{v:.4g}" if isinstance(v, float) else str(v))
        for k, v in rows[-1].items() if k != "kl"})
    assert info == 1.0
