"""The alarms end to end in the real GRPO loop (rlhf_trainer.alarms; decisions are unit-tested in
tests/unit/test_alarms.py): each case turns bad after step 2 by construction, and the alarm must
reach the metrics line, the rlhf_trainer_alarm gauge and the alarms info series (what the operator
reads into status.progress.alarms and the Degraded condition, tests/unit/test_planner.py).

- NegativeKL: the reference's log-probs are raised by 0.5 nat per token, as when sampling forces
  tokens the policy's log-probs do not describe: every k1 term log pi - log pi_ref goes negative.
- LengthCollapse: the responses are cut to their first token (8 tokens before).
- RewardHacking: every response becomes one token repeated (what a reward paying for a repeated
  string ends with): distinct-2 falls to 1/7.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from trainer_harness import trainer_config
from trainer_inprocess import colocated_roles, in_process_context, role_world, run_actor  # noqa: F401

BAD_FROM_STEP = 3


def _step_counter():
    return {"n": 0}


def raise_reference(monkeypatch):
    from rlhf_trainer.roles import ReferenceService

    real, calls = ReferenceService.handle, _step_counter()

    def handle(self, method, tensors, meta):
        calls["n"] += 1
        out, reply = real(self, method, tensors, meta)
        if calls["n"] >= BAD_FROM_STEP:
            out = {"logprobs": out["logprobs"] + 0.5}
        return out, reply

    monkeypatch.setattr(ReferenceService, "handle", handle)


def rewrite_rollouts(monkeypatch, edit):
    import rlhf_trainer.algorithms.grpo as grpo

    real, calls = grpo.rollout, _step_counter()

    def rollout(*args, **kwargs):
        roll = real(*args, **kwargs)
        calls["n"] += 1
        return edit(roll) if calls["n"] >= BAD_FROM_STEP else roll

    monkeypatch.setattr(grpo, "rollout", rollout)


def first_token_only(roll):
    mask = torch.zeros_like(roll.action_mask)
    mask[:, 0] = 1
    prompt = roll.sequences.shape[1] - mask.shape[1]
    return dataclasses.replace(roll, action_mask=mask, attention_mask=torch.cat(
        [roll.attention_mask[:, :prompt], mask], dim=1), responses=[r[:1] for r in roll.responses])


def one_token_repeated(roll):
    R = roll.action_mask.shape[1]
    sequences = roll.sequences.clone()
    sequences[:, -R:] = sequences[:, -R:][:, :1]  # the first response token, R times
    mask = torch.ones_like(roll.action_mask)
    prompt = sequences.shape[1] - R
    return dataclasses.replace(roll, sequences=sequences, action_mask=mask, truncated=torch.ones_like(roll.truncated),
                               attention_mask=torch.cat([roll.attention_mask[:, :prompt], mask], dim=1),
                               responses=[r[:1] * R for r in roll.responses])


CASES = {
    "NegativeKL": lambda mp: raise_reference(mp),
    "LengthCollapse": lambda mp: rewrite_rollouts(mp, first_token_only),
    "RewardHacking": lambda mp: rewrite_rollouts(mp, one_token_repeated),
}


@pytest.mark.parametrize("reason", CASES)
def test_alarm_fires_after_the_case_turns_bad(role_world, tmp_path, monkeypatch, reason):  # noqa: F811
    CASES[reason](monkeypatch)
    config = trainer_config("grpo", roles=colocated_roles(("actor", "reference")),
                            checkpoint={"interval_steps": 100, "keep": 1},
                            hyperparameters={"max_steps": 4, "batch_size": 4, "micro_batch_size": 8,
                                             "max_new_tokens": 8, "group_size": 2, "alarm_window": 2,
                                             "learning_rate": 1e-6})
    ctx = in_process_context(config, tmp_path)
    run_actor(ctx)
    rows = [json.loads(line) for line in open(ctx.metrics.jsonl_path)]
    fired = [sorted(r["alarms"]) for r in rows]
    assert all(reason not in f for f in fired[:BAD_FROM_STEP - 1]), fired  # healthy while the case is
    assert reason in fired[-1], fired
    assert ctx.metrics.registry.get_sample_value("rlhf_trainer_alarm", {"reason": reason}) == 1.0
    info = {f.name: f for f in ctx.metrics.registry.collect()}["rlhf_trainer_alarms"].samples[0].labels
    assert reason in info and info[reason] == rows[-1]["alarms"][reason]
