"""Multi-turn rollouts and SCoRe end to end: `python -m rlhf_trainer` processes on a tiny Llama (issue 14).

- multi-turn GRPO (3 policy turns) and PPO (2, with a critic) train, checkpoint and export with finite
  metrics, the samples holding the environment's instruction between the turns;
- SCoRe on GRPO stopped inside stage I resumes there: the resumed steps are stage I up to
  scoreStageOneSteps and stage II after, from the checkpoint's step.
"""

import json
import math

import pytest
from rlhf_contract.config import Hyperparameters
from trainer_harness import launch, trainer_config

INSTRUCTION = Hyperparameters().turn_instruction
TURN_METRICS = ("accuracy_t1", "accuracy_t2", "accuracy_delta", "wrong_to_right", "right_to_wrong")
ACTOR_AND_REFERENCE = {"actor": {}, "reference": {"colocate_with": "actor"}}


def assert_finite(rows, keys):
    for row in rows:
        for key in keys:
            assert row.get(key) is not None and math.isfinite(row[key]), (row["step"], key, row.get(key))


@pytest.mark.slow
def test_multi_turn_grpo_trains_and_exports_with_the_instruction_between_turns(tmp_path):
    config = trainer_config("grpo", roles=ACTOR_AND_REFERENCE, hyperparameters={
        "turns": 3, "max_steps": 2, "sample_interval_steps": 1, "samples_per_step": 2},
        dataset={"path": "synthetic://arithmetic", "format": "prompts",
                 "eval_path": "synthetic://arithmetic?size=8&seed=1"})
    run = launch(config, tmp_path)
    assert run.ok, run.describe()
    rows = [r for r in run.metrics() if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite(rows, ("reward_mean", "kl", "policy_loss", "entropy", *TURN_METRICS, "reward_t1", "reward_t3"))
    assert all("score_stage" not in r for r in rows)  # no selfCorrection
    # The held-out evaluation runs the same conversations (step 0: the initial policy, then every checkpoint).
    evaluated = [r for r in run.metrics() if "eval_accuracy_t1" in r]
    assert [r["step"] for r in evaluated] == [0, 1, 2]
    assert_finite(evaluated, ("eval_reward_mean", "eval_pass_rate", "eval_accuracy_t1", "eval_accuracy_t2",
                              "eval_wrong_to_right", "eval_right_to_wrong"))
    # Only the policy's tokens count as the response: at most 3 turns x maxNewTokens.
    assert all(1 <= r["response_length"] <= 3 * 4 for r in rows)
    samples = [json.loads(line) for line in (run.checkpoint_dir / "samples" / "actor-0.jsonl").read_text().splitlines()]
    assert samples and all(s["response"].count(INSTRUCTION) == 2 for s in samples)
    assert (run.checkpoint_dir / "export" / "config.json").is_file()


@pytest.mark.slow
def test_multi_turn_ppo_with_self_correction_trains_the_critic_on_policy_tokens(tmp_path):
    config = trainer_config("ppo", hyperparameters={"turns": 2, "max_steps": 2, "self_correction": "score",
                                                    "score_stage_one_steps": 1})
    run = launch(config, tmp_path)
    assert run.ok, run.describe()
    rows = run.metrics()
    assert [r["score_stage"] for r in rows] == [1.0, 2.0]
    assert_finite(rows, ("reward_mean", "kl", "policy_loss", "value_loss", *TURN_METRICS))
    assert (run.checkpoint_dir / "export" / "config.json").is_file()


@pytest.mark.slow
def test_score_resumed_inside_stage_one_continues_stage_one_then_stage_two(tmp_path):
    hyperparameters = {"turns": 2, "max_steps": 2, "self_correction": "score", "score_stage_one_steps": 3}
    config = trainer_config("grpo", roles=ACTOR_AND_REFERENCE, hyperparameters=hyperparameters)
    first = launch(config, tmp_path / "attempt0")
    assert first.ok, first.describe()
    assert [r["score_stage"] for r in first.metrics()] == [1.0, 1.0]

    config["hyperparameters"]["max_steps"] = 5
    second = launch(config, tmp_path / "attempt1", checkpoint_dir=first.checkpoint_dir, restart_attempt=1)
    assert second.ok, second.describe()
    assert "resumed from step 2" in second.logs["actor-0"]
    rows = second.metrics()[2:]  # the resumed run's lines follow the first run's in the same file
    assert [(r["step"], r["score_stage"]) for r in rows] == [(3, 1.0), (4, 2.0), (5, 2.0)]
    assert_finite(rows, ("reward_mean", "kl", "policy_loss", *TURN_METRICS))
