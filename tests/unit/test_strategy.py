"""build_ds_config as a table, and one real DeepSpeed engine step on CPU (world of one)."""

import math

import pytest
import torch
from rlhf_contract.config import DeepSpeedConfig
from rlhf_trainer.strategy import DeepSpeedStrategy, build_ds_config, gradient_norm
from trainer_world import role_world, tiny_causal_lm  # noqa: F401 (fixtures)

BASE = dict(zero_stage=2, bf16=False, offload_optimizer=False, micro_batch_size=4, grad_accum=2)

CASES = {
    "zero2 defaults": (
        BASE,
        {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 8},
    ),
    "batch counts every process": (
        {**BASE, "world_size": 3},
        {"train_batch_size": 24},
    ),
    "bf16 on": ({**BASE, "bf16": True}, {"bf16": {"enabled": True}}),
    "clipping passed through": ({**BASE, "gradient_clipping": 0.5}, {"gradient_clipping": 0.5}),
}


@pytest.mark.parametrize("name", CASES)
def test_build_ds_config_cases(name):
    kwargs, expected = CASES[name]
    config = build_ds_config(**kwargs)
    for key, value in expected.items():
        assert config[key] == value, key
    assert "optimizer" not in config  # a torch AdamW is passed instead (no CPU Adam compile)


def test_bf16_off_means_no_bf16_section():
    assert "bf16" not in build_ds_config(**BASE)


def test_offload_sets_cpu_device():
    config = build_ds_config(**{**BASE, "offload_optimizer": True})
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_zero3_gathers_weights_for_export():
    zero = build_ds_config(**{**BASE, "zero_stage": 3})["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"zero_stage": 4}, "zero_stage"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"zero_stage": 0, "offload_optimizer": True}, "offload_optimizer"),
    ],
)
def test_bad_settings_name_the_field(bad, words):
    with pytest.raises(ValueError, match=words):
        build_ds_config(**{**BASE, **bad})


def test_accumulates_then_steps_once(role_world, tiny_causal_lm):  # noqa: F811
    """With grad_accum=2 the weights change only after the second micro-batch."""
    strategy = DeepSpeedStrategy(
        tiny_causal_lm, DeepSpeedConfig(zero_stage=2), learning_rate=1e-2, micro_batch_size=2, grad_accum=2
    )
    before = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    for expected_changed in (False, True):
        loss = strategy.forward(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        strategy.backward(loss)
        strategy.step()
        changed = any(not torch.equal(before[k], v) for k, v in strategy.module.state_dict().items())
        assert changed is expected_changed
    full = strategy.full_state_dict()
    assert set(full) == set(before)
    assert strategy.optimizer_state_tensors()  # AdamW moments exist after a step


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_non_finite_gradient_never_reaches_the_weights(role_world, tiny_causal_lm, zero_stage):  # noqa: F811
    """ZeRO-2 skips the step itself (DeepSpeed's overflow check); at ZeRO-0 the strategy drops the
    gradients. Either way step() says so, and the next finite step is applied."""
    strategy = DeepSpeedStrategy(
        tiny_causal_lm, DeepSpeedConfig(zero_stage=zero_stage), learning_rate=1e-2, micro_batch_size=2, grad_accum=1
    )
    poisoned = {"on": True}
    strategy.module.get_input_embeddings().weight.register_hook(
        lambda g: g * float("nan") if poisoned["on"] else g)
    before = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    strategy.backward(strategy.forward(input_ids=ids, labels=ids).loss)
    outcome = strategy.step()
    assert outcome is not None and outcome.applied is False
    assert outcome.grad_norm is not None and not math.isfinite(outcome.grad_norm)
    assert all(torch.equal(before[k], v) for k, v in strategy.module.state_dict().items())

    poisoned["on"] = False
    strategy.backward(strategy.forward(input_ids=ids, labels=ids).loss)
    outcome = strategy.step()
    assert outcome.applied is True and math.isfinite(outcome.grad_norm) and outcome.grad_norm > 0
    after = strategy.module.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    assert all(torch.isfinite(v).all() for v in after.values())


def test_step_between_boundaries_returns_none(role_world, tiny_causal_lm):  # noqa: F811
    strategy = DeepSpeedStrategy(
        tiny_causal_lm, DeepSpeedConfig(zero_stage=0), learning_rate=1e-2, micro_batch_size=2, grad_accum=2
    )
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    strategy.backward(strategy.forward(input_ids=ids, labels=ids).loss)
    assert strategy.step() is None
    strategy.backward(strategy.forward(input_ids=ids, labels=ids).loss)
    assert strategy.step().applied is True


def test_gradient_norm_of_no_gradients_is_zero():
    p = torch.nn.Parameter(torch.ones(3))
    assert gradient_norm([p]) == 0.0
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert gradient_norm([p]) == pytest.approx(5.0)
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    assert gradient_norm([p]) == float("inf")
