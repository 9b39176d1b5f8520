"""A restarted gang resumes every role from the newest usable COMPLETE checkpoint and continues exactly.

Three processes (actor, critic, reference): run 2 steps, damage the critic's newest checkpoint, run
again to step 3. Every role must fall back to step 1 (the same step everywhere), and the re-run of
step 2 must reproduce the first run's step 2 bit for bit: same weights, optimizer state, RNG and
data position on every role.
"""

import pytest
from rlhf_trainer import checkpoint
from trainer_harness import launch, trainer_config


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path):
    config = trainer_config("ppo", hyperparameters={"max_steps": 2})
    first = launch(config, tmp_path / "attempt0")
    assert first.ok, first.describe()
    ckpt = first.checkpoint_dir
    assert checkpoint.select_resume_step(ckpt, sorted(config["roles"])) == 2

    # Truncate one file of the critic's step 2: the step is COMPLETE but no longer loads.
    victim = sorted((checkpoint.step_dir(ckpt, 2) / "critic").rglob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])

    config["hyperparameters"]["max_steps"] = 3
    second = launch(config, tmp_path / "attempt1", checkpoint_dir=ckpt, restart_attempt=1)
    assert second.ok, second.describe()
    for name in ("actor-0", "critic-0", "reference-0"):
        assert "resumed from step 1" in second.logs[name], second.logs[name][-2000:]

    rows = second.metrics()
    assert [r["step"] for r in rows] == [1, 2, 2, 3]
    original, rerun = rows[1], rows[2]
    for key in ("reward_mean", "kl", "policy_loss", "value_loss", "entropy", "response_length"):
        assert rerun[key] == original[key], key
    assert checkpoint.select_resume_step(ckpt, sorted(config["roles"])) == 3
