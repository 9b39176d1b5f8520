"""Actor ranks sample from RNG streams of their own.

With the one run seed on every rank, every rank drew the same random numbers: row i of each rank sampled
the same tokens, so a prompt seen by two ranks got the same response twice, and a near-uniform policy gave
every rank's row i the same response whatever the prompt (found in a PPO run of two pods x two processes,
where the step's eight KL terms came in four identical pairs and fired the NegativeKL alarm).
"""

from __future__ import annotations

import json

import pytest
import torch
from rlhf_trainer import checkpoint
from trainer_harness import launch, trainer_config

ACTORS, ROWS_PER_RANK = 2, 4


def test_rank_streams_differ_by_rank_and_repeat_by_seed():
    def draw(seed, rank):
        checkpoint.seed_rank_stream(seed, rank)
        return torch.rand(8)

    assert torch.equal(draw(3, 1), draw(3, 1))
    assert not torch.equal(draw(3, 0), draw(3, 1))


@pytest.mark.slow
def test_two_actor_ranks_sample_different_responses_to_the_same_prompt(tmp_path):
    data = tmp_path / "prompts.jsonl"  # one prompt: the same rows on both ranks
    data.write_text("".join(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" for _ in range(16)))
    config = trainer_config(
        "grpo",
        roles={"actor": {"replicas": ACTORS}, "reference": {"colocate_with": "actor"}},
        hyperparameters={"max_steps": 1, "batch_size": ACTORS * ROWS_PER_RANK // 2, "group_size": 2,
                         "micro_batch_size": ROWS_PER_RANK, "max_new_tokens": 6, "temperature": 1.0,
                         "sample_interval_steps": 1, "samples_per_step": ROWS_PER_RANK},
        dataset={"path": str(data), "format": "prompts"},
    )
    run = launch(config, tmp_path / "run", timeout=240)
    assert run.ok, run.describe()
    responses = []
    for rank in range(ACTORS):
        path = run.checkpoint_dir / "samples" / f"actor-{rank}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["1+1="] * ROWS_PER_RANK
        responses.append([r["response"] for r in rows])
    # Six tokens from a ~uniform tiny policy: independent streams agree on a whole row by chance ~never.
    assert all(a != b for a, b in zip(*responses, strict=True)), responses
