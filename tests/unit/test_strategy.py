"""build_ds_config as a table, and one real DeepSpeed engine step on CPU (world of one)."""

import pytest
import torch
from rlhf_contract.config import DeepSpeedConfig
from rlhf_trainer.strategy import DeepSpeedStrategy, build_ds_config
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
