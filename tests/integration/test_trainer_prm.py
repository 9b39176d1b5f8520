"""Process reward model jobs as processes: prm-label writes TRL's stepwise rows (kept over a restart),
and a prm job trains on them and exports a token classifier."""

from __future__ import annotations

import json
import math

import pytest
from trainer_harness import launch, trainer_config

# A random tiny policy writes random text; "contains a digit" is a verifier it sometimes passes,
# and splitting at spaces gives responses of several steps.
LABEL_JOB = {
    "dataset": {"path": "synthetic://arithmetic", "format": "prompts"},
    "reward": {"type": "rule", "rule": "regex", "pattern": r"\d"},
}
LABEL_HYPERPARAMETERS = {"batch_size": 4, "micro_batch_size": 4, "group_size": 2, "max_new_tokens": 8,
                         "step_separator": " ", "prm_completions": 2}


def _rows(run):
    path = run.checkpoint_dir / "export" / "prm_labels.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_prm_label_writes_stepwise_rows_that_survive_a_restart_and_train_a_prm(tmp_path):
    from rlhf_trainer.data import load_dataset

    checkpoints = tmp_path / "checkpoints"
    first = launch(trainer_config("prm-label", hyperparameters={**LABEL_HYPERPARAMETERS, "max_steps": 1},
                                  checkpoint={"interval_steps": 1, "keep": 2}, **LABEL_JOB),
                   tmp_path / "first", checkpoint_dir=checkpoints)
    assert first.ok, first.describe()
    step1 = _rows(first)
    # The job is extended to 2 steps and restarted: it resumes from step 1 with its rows.
    second = launch(trainer_config("prm-label", hyperparameters={**LABEL_HYPERPARAMETERS, "max_steps": 2},
                                   checkpoint={"interval_steps": 1, "keep": 2}, **LABEL_JOB),
                    tmp_path / "second", checkpoint_dir=checkpoints, restart_attempt=1)
    assert second.ok, second.describe()
    rows = _rows(second)
    assert rows[:len(step1)] == step1 and len(rows) > len(step1)
    metrics = second.metrics()
    assert [m["step"] for m in metrics] == [1, 2]  # one line per run's step (the file is appended)
    assert sum(m["labelled_rows"] for m in metrics) == len(rows)
    for row in rows:
        assert len(row["completions"]) == len(row["labels"]) > 0
        assert row["labels"] == sorted(row["labels"], reverse=True)  # no correct step after a wrong one
    assert any(False in row["labels"] for row in rows) and any(True in row["labels"] for row in rows)

    labelled = str(checkpoints / "export" / "prm_labels.jsonl")
    assert len(load_dataset(labelled, "stepwise", kind="steps")) == len(rows)
    train = launch(trainer_config("prm", dataset={"path": labelled, "format": "stepwise"},
                                  hyperparameters={"step_separator": " "}), tmp_path / "prm")
    assert train.ok, train.describe()
    assert all(math.isfinite(m["loss"]) and 0 <= m["step_accuracy"] <= 1 for m in train.metrics())
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(train.checkpoint_dir / "export")
    assert model.config.num_labels == 2


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_online_algorithms_take_dense_rewards_from_a_process_reward_model(algorithm, tmp_path):
    """reward.type prm: the reward role serves a PRM (a random tiny one here), its step scores join the
    rewards (process_reward), the rule gives the outcome, and PPO's critic starts from the PRM."""
    roles = {"actor": {}, "reward": {}, "reference": {"colocate_with": "reward"}}
    if algorithm == "ppo":
        roles["critic"] = {"colocate_with": "actor"}
    config = trainer_config(
        algorithm, roles=roles, reward_model="tiny://llama",
        reward={"type": "prm", "rule": "exact_match", "skip_pattern": "^#", "normalize_steps": True,
                "value_init": algorithm == "ppo"},
        dataset={"path": "synthetic://partial_sums", "format": "prompts"},
        hyperparameters={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "max_new_tokens": 8,
                         "group_size": 2, "step_separator": " "},
    )
    run = launch(config, tmp_path)
    assert run.ok, run.describe()
    rows = run.metrics()
    assert all(math.isfinite(r["process_reward"]) and -1 <= r["process_reward"] <= 1 for r in rows)
    assert any(r["process_reward"] != 0 for r in rows)
    assert all(0 <= r["reward_mean"] <= 1 for r in rows)  # the outcome rule alone
