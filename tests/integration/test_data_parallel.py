"""Two data-parallel actor ranks train the model one rank trains on the same global batch.

Every rank draws the same global batch and takes its shard (data.Sampler, data.shard); DeepSpeed
averages the ranks' gradients, and a loss normalised by a count (tokens, rows) divides by the whole
batch's (common.global_normaliser). So one rank with batch B and two ranks with B / 2 each take the
same optimizer step from the same weights, and their runs log the same losses step after step: a rank
that sees the wrong shard, a loss divided by its own rank's tokens, a gradient summed instead of
averaged or metrics not averaged over ranks each make the two curves part within a step or two.

Offline algorithms only: a sampling algorithm's ranks draw from RNG streams of their own
(test_trainer_rank_sampling.py), so their runs differ by design.
"""

from __future__ import annotations

import json

import pytest
from trainer_harness import launch, trainer_config

pytestmark = pytest.mark.slow

GLOBAL_BATCH, STEPS = 8, 4
NO_CHECKPOINTS = {"interval_steps": 10_000, "keep": 1}
# algorithm -> the step log's figures that must match; the first is the loss.
CASES = {
    # SFT's loss is a mean over answer tokens, and _ragged_answers' answers are 1 to 6 words long: the
    # two ranks hold different numbers of tokens, so only a normaliser over the whole batch matches one rank.
    "sft": ("loss",),
    "dpo": ("loss", "preference_accuracy", "reward_mean"),
    "rm": ("loss", "preference_accuracy", "reward_mean"),
}


def _ragged_answers(path) -> dict:
    """SFT rows whose answers are 1 to 6 words (one token each for the tiny tokenizer) long."""
    words = ("apple", "river", "stone", "cloud", "green", "tiger")
    rows = [{"instruction": "Say some words.", "input": str(i), "output": " ".join(words[:1 + (i * 5) % 6])}
            for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(path), "format": "instruction"}


def _curve(algorithm: str, replicas: int, workdir) -> list[dict]:
    roles = {"actor": {"replicas": replicas}}
    if algorithm == "dpo":
        roles["reference"] = {"colocate_with": "actor"}
    workdir.mkdir(parents=True)
    data = {"dataset": _ragged_answers(workdir / "answers.jsonl")} if algorithm == "sft" else {}
    config = trainer_config(algorithm, roles=roles, checkpoint=NO_CHECKPOINTS, hyperparameters={
        "max_steps": STEPS, "batch_size": GLOBAL_BATCH, "micro_batch_size": GLOBAL_BATCH // 2,
        "learning_rate": 1e-3}, **data)
    run = launch(config, workdir, timeout=240)
    assert run.ok, run.describe()
    return run.metrics()


@pytest.mark.parametrize("algorithm", CASES)
def test_two_ranks_log_the_losses_of_one_rank_on_the_same_global_batch(tmp_path, algorithm):
    one, two = _curve(algorithm, 1, tmp_path / "one"), _curve(algorithm, 2, tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    loss = CASES[algorithm][0]
    # The loss moves by several percent a step at this learning rate; float noise from the all-reduce's
    # order of additions stays below 1e-4.
    assert one[-1][loss] != pytest.approx(one[0][loss], rel=1e-2), "the loss must move for the test to mean anything"
    for a, b in zip(one, two, strict=True):
        for key in CASES[algorithm]:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (algorithm, key, one, two)
