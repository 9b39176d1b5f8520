"""A NaN entering at the reward, a loss or the gradients, for every algorithm (finite.py):

- nonFinite: fail -> NonFiniteError at the step it entered, naming where (and the rows / source);
- nonFinite: skip -> the run finishes, the value is counted (metric + JSONL), the weights are finite
  and were updated by the other steps.

Each case poisons the first call only (step 1), in the actor's process (every role colocated).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from rlhf_contract.algorithms import required_roles
from rlhf_trainer import models
from rlhf_trainer.finite import NonFiniteError
from trainer_harness import trainer_config
from trainer_inprocess import colocated_roles, in_process_context, role_world, run_actor  # noqa: F401

NAN = float("nan")


def first_call_poisoned(fn, value=NAN):
    """`fn` whose first result (or the first element of a tuple result) is multiplied by `value`."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        out = fn(*args, **kwargs)
        if calls["n"] > 1:
            return out
        if isinstance(out, tuple):  # a NamedTuple (losses.dpo.DPOOutput) keeps its type
            return type(out)(out[0] * value, *out[1:]) if hasattr(out, "_fields") else (out[0] * value, *out[1:])
        return out * value

    return wrapped


def poison_reward(monkeypatch, algorithm):
    """The rule reward scores row 1 NaN on its first call."""
    import rlhf_trainer.rewards as rewards

    real = rewards.build_reward_fn
    calls = {"n": 0}

    def build(reward):
        fn = real(reward)

        def score(prompts, responses, answers):
            calls["n"] += 1
            out = fn(prompts, responses, answers)
            return [NAN if calls["n"] == 1 and i == 1 else v for i, v in enumerate(out)]

        return score

    monkeypatch.setattr(rewards, "build_reward_fn", build)


LOSS_FUNCTIONS = {
    "ppo": ("rlhf_trainer.algorithms.ppo", "policy_loss"),
    "grpo": ("rlhf_trainer.algorithms.grpo", "policy_loss"),
    "rloo": ("rlhf_trainer.algorithms.grpo", "policy_loss"),
    "dpo": ("rlhf_trainer.algorithms.dpo", "dpo_loss"),
    "rm": ("rlhf_trainer.algorithms.rm", "bradley_terry_loss"),
    "sft": ("rlhf_trainer.algorithms.sft", "sft_loss"),
    "critic": ("rlhf_trainer.roles", "value_loss"),
}


def poison_loss(monkeypatch, algorithm):
    import importlib

    module_name, attr = LOSS_FUNCTIONS[algorithm]
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, attr, first_call_poisoned(getattr(module, attr)))


def poison_gradients(monkeypatch, algorithm):
    """The actor model's embedding gradient is NaN in its first backward (the loss is finite)."""
    from rlhf_trainer.algorithms.common import ActorAlgorithm

    real = ActorAlgorithm.__init__
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * NAN if calls["n"] == 1 else grad

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.strategy.module.get_input_embeddings().weight.register_hook(hook)

    monkeypatch.setattr(ActorAlgorithm, "__init__", init)


POISON = {"reward": poison_reward, "loss": poison_loss, "grad_norm": poison_gradients}
RL = ("ppo", "grpo", "rloo")
CASES = [(a, w) for a in (*RL, "dpo", "rm", "sft") for w in ("reward", "loss", "grad_norm")
         if w != "reward" or a in RL]
CASES.append(("critic", "loss"))  # PPO's value loss, trained on the colocated critic


def config_for(case_algorithm: str, policy: str, zero_stage: int = 2) -> dict:
    algorithm = "ppo" if case_algorithm == "critic" else case_algorithm
    roles = colocated_roles(required_roles(algorithm, "rule"))
    roles["actor"]["deepspeed"] = {"zero_stage": zero_stage}
    return trainer_config(algorithm, roles=roles, checkpoint={"interval_steps": 100, "keep": 1},
                          hyperparameters={"max_steps": 2, "batch_size": 4, "micro_batch_size": 2,
                                           "non_finite": policy})


@pytest.mark.parametrize(("algorithm", "where"), CASES, ids=[f"{a}-{w}" for a, w in CASES])
def test_fail_names_the_step_and_where(role_world, tmp_path, monkeypatch, algorithm, where):  # noqa: F811
    POISON[where](monkeypatch, algorithm)
    ctx = in_process_context(config_for(algorithm, "fail"), tmp_path)
    with pytest.raises(NonFiniteError) as err:
        run_actor(ctx)
    message = str(err.value)
    assert message.startswith(f"step 1: non-finite {where}:"), message
    assert "nonFinite: skip" in message  # says how to opt out
    if where == "reward":
        assert "reward.rule exact_match" in message and "row 1 (synthetic://arithmetic#" in message
    if where == "loss":
        assert "loss is nan" in message
    if where == "grad_norm":
        assert "gradients: the gradient norm is" in message
    assert not (tmp_path / "checkpoints" / "export").exists()


def _exported_weights(ctx) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ctx.env.checkpoint_dir + "/export/model.safetensors"))


def _initial_weights(ctx) -> dict[str, torch.Tensor]:
    loader = models.load_reward_model if ctx.cfg.algorithm == "rm" else models.load_policy
    return loader(ctx.cfg.model.path, seed=ctx.cfg.hyperparameters.seed).state_dict()


@pytest.mark.parametrize(("algorithm", "where"), CASES, ids=[f"{a}-{w}" for a, w in CASES])
def test_skip_counts_and_trains_on(role_world, tmp_path, monkeypatch, algorithm, where):  # noqa: F811
    initial = None
    POISON[where](monkeypatch, algorithm)
    ctx = in_process_context(config_for(algorithm, "skip"), tmp_path)
    initial = _initial_weights(ctx)
    run_actor(ctx)

    assert ctx.guard.skipped[where] == 1, dict(ctx.guard.skipped)
    assert sum(ctx.guard.skipped.values()) == 1
    sample = ctx.metrics.registry.get_sample_value("rlhf_trainer_non_finite_total", {"where": where})
    assert sample == 1.0
    rows = [json.loads(line) for line in open(ctx.metrics.jsonl_path)]
    assert [r["non_finite_skipped"] for r in rows] == [1.0, 0.0]
    assert all(r.get("loss") is None or math.isfinite(r["loss"]) for r in rows)
    exported = _exported_weights(ctx)
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert any(not torch.equal(exported[k], v) for k, v in initial.items() if k in exported)


def test_grad_norm_at_zero_stage_0_is_caught_too(role_world, tmp_path, monkeypatch):  # noqa: F811
    """ZeRO-0 has no overflow check of its own: the strategy computes the norm (test_strategy.py)."""
    poison_gradients(monkeypatch, "sft")
    ctx = in_process_context(config_for("sft", "fail", zero_stage=0), tmp_path)
    with pytest.raises(NonFiniteError, match="step 1: non-finite grad_norm: actor gradients: the gradient norm is nan"):
        run_actor(ctx)


def test_every_step_skipped_fails_instead_of_exporting_the_initial_weights(role_world, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    import rlhf_trainer.algorithms.sft as sft

    monkeypatch.setattr(sft, "sft_loss", lambda *a, **k: torch.tensor(NAN, requires_grad=True))
    ctx = in_process_context(config_for("sft", "skip"), tmp_path)
    with pytest.raises(NonFiniteError, match="all 2 steps of this run were skipped .* never updated"):
        run_actor(ctx)
    assert not (tmp_path / "checkpoints" / "export").exists()
