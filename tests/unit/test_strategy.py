"""build_ds_config as a table, and one real DeepSpeed engine step on CPU (world of one)."""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rlhf_contract.config import DeepSpeedConfig
from rlhf_trainer.strategy import (
    DeepSpeedStrategy,
    build_ds_config,
    clip_gradients,
    gradient_norm,
    needs_gradient_allreduce,
    needs_synced_generation,
)
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
    assert config["zero_force_ds_cpu_optimizer"] is False  # our torch AdamW steps the offloaded states


def test_offloaded_optimizer_steps(role_world, tiny_causal_lm):  # noqa: F811
    """offloadOptimizer with our torch AdamW builds and steps (DeepSpeed refused it before)."""
    strategy = DeepSpeedStrategy(tiny_causal_lm, DeepSpeedConfig(zero_stage=2, offload_optimizer=True),
                                 learning_rate=1e-2, micro_batch_size=2, grad_accum=1)
    before = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    strategy.backward(strategy.forward(input_ids=ids, labels=ids).loss)
    strategy.step()
    assert any(not torch.equal(before[k], v) for k, v in strategy.module.state_dict().items())


def test_zero3_gathers_weights_for_export():
    zero = build_ds_config(**{**BASE, "zero_stage": 3})["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


SYNCED_GENERATION = {
    # name: (zero stage, world size, ranks kept in step while sampling)
    "zero3, two ranks: every forward gathers parameters collectively": (3, 2, True),
    "zero3, eight ranks": (3, 8, True),
    "zero3 alone in its world: nobody to wait for": (3, 1, False),
    "zero2 holds whole parameters on every rank": (2, 8, False),
    "zero0": (0, 4, False),
}


@pytest.mark.parametrize("name", SYNCED_GENERATION)
def test_synced_generation_cases(name):
    stage, world, expected = SYNCED_GENERATION[name]
    assert needs_synced_generation(stage, world) is expected


GRADIENT_ALLREDUCE = {
    # name: (zero stage, world size, DeepSpeed's backward all-reduce kept)
    "stage 0 alone: nothing to average": (0, 1, False),
    "stage 0 with data parallel ranks": (0, 2, True),
    "stage 1 alone: its optimizer reduces into its partitions": (1, 1, True),
    "stage 2 alone": (2, 1, True),
    "stage 3 with ranks": (3, 4, True),
}


@pytest.mark.parametrize("name", GRADIENT_ALLREDUCE)
def test_gradient_allreduce_cases(name):
    stage, world, expected = GRADIENT_ALLREDUCE[name]
    assert needs_gradient_allreduce(stage, world) is expected


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


def test_stage0_alone_steps_like_plain_torch_adamw_with_clipping(role_world, tiny_causal_lm):  # noqa: F811
    """Without DeepSpeed's all-reduce (alone at stage 0) and with the fused AdamW, two steps equal
    a plain torch AdamW (non-fused) with clip_grad_norm_ on a copy of the model."""
    import copy

    reference = copy.deepcopy(tiny_causal_lm)
    strategy = DeepSpeedStrategy(
        tiny_causal_lm, DeepSpeedConfig(zero_stage=0), learning_rate=1e-2, micro_batch_size=2, grad_accum=1
    )
    assert strategy.engine.enable_backward_allreduce is False
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), fused=False)
    norms = []
    for seed in (0, 1):
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
        strategy.backward(strategy.forward(input_ids=ids, labels=ids).loss)
        norms.append(strategy.step().grad_norm)
        reference(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert max(norms) > 1.0  # the clipping (the strategy's own at stage 0) was really applied
    mine = dict(strategy.module.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(mine[name], param, rtol=1e-5, atol=1e-6, msg=name)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
       scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_clip_gradients_scales_as_torch_clip_grad_norm(shapes, scale, max_norm, seed):
    """The strategy's own clipping at stage 0, given the norm it has computed, scales the gradients
    as torch.nn.utils.clip_grad_norm_ does (and leaves them alone below max_norm)."""
    gen = torch.Generator().manual_seed(seed)
    mine = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for a, b in zip(mine, theirs, strict=True):
        a.grad = torch.randn(a.shape, generator=gen) * scale
        b.grad = a.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    clip_gradients(mine, gradient_norm(mine), max_norm)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    if norm < 0.999 * max_norm:  # clearly below: no scaling at all
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(mine, theirs, strict=True))


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


def test_deepspeed_imports_without_its_autotuners_mlflow_and_mlflow_still_imports_afterwards():
    """import_deepspeed keeps DeepSpeed's optional `import mlflow` out of a trainer's start-up, and leaves no
    trace: the trackers' `import mlflow` works as usual afterwards. A fresh interpreter: this session's may
    have imported both already."""
    code = (
        "import sys\n"
        "from rlhf_trainer.distributed import import_deepspeed\n"
        "ds = import_deepspeed()\n"
        "import deepspeed.autotuning.autotuner as tuner\n"
        "print(tuner.has_mlflow, 'mlflow' in sys.modules, import_deepspeed() is ds)\n"
        "import mlflow\n"
        "print(mlflow.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # (DeepSpeed logs its accelerator choice on stdout first)
    assert done.stdout.splitlines()[-2:] == ["False False True", "mlflow"], done.stdout
