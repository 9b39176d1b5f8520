"""A LoRA actor on a bitsandbytes-quantized base (roles.actor.lora.quantization), end to end: two DPO
steps whose reference is the actor's quantized base with adapters disabled, finite losses, a merged
export that is a plain full-precision model transformers reloads, and a restart that resumes. On the
CUDA GPU when there is one (bf16 compute), else on bitsandbytes' CPU backend (fp32 compute): CI runs it.
tests/integration/test_trainer_errors.py checks the config error where bitsandbytes does not import.
"""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_trainer import models
from trainer_harness import launch, trainer_config
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """The tiny llama as a model folder: a quantized base is read by from_pretrained."""
    folder = tmp_path_factory.mktemp("base")
    models.save_pretrained(models.load_policy("tiny://llama", seed=0), models.load_tokenizer("tiny://llama"), folder)
    return folder


@pytest.mark.parametrize("lora", [{"quantization": "4bit", "quant_type": "nf4", "double_quant": True},
                                  {"quantization": "4bit", "quant_type": "fp4"},
                                  {"quantization": "8bit"}], ids=["4bit-nf4-double", "4bit-fp4", "8bit"])
def test_dpo_on_a_quantized_base_trains_adapters_and_exports_a_full_precision_model(tmp_path, base_folder, lora):
    roles = {"actor": {"lora": {"rank": 4, "alpha": 16.0, **lora}, "deepspeed": {"zero_stage": 2, "bf16": torch.cuda.is_available()}},
             "reference": {"colocate_with": "actor"}}
    config = trainer_config("dpo", model={"path": str(base_folder)}, roles=roles,
                            hyperparameters={"max_steps": 2, "learning_rate": 1e-2})
    run = launch(config, tmp_path)
    assert run.ok, run.describe()
    log = run.logs["actor-0"]
    assert f"actor: the base loaded {lora['quantization']} by bitsandbytes" in log
    assert "reference: the actor's base model with its adapters disabled" in log
    rows = run.metrics()
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # zero adapters at step 1: the policy is the reference (up to the quantized kernels' rounding)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)

    export = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "export")
    assert not any("lora" in n for n, _ in export.named_parameters())
    assert not getattr(export, "is_quantized", False) and all(p.is_floating_point() for p in export.parameters())
    initial = models.load_policy(str(base_folder), seed=0)
    assert any(not torch.equal(p, initial.get_parameter(n)) for n, p in export.named_parameters())
    ids = models.load_tokenizer(str(base_folder))("3+4=", return_tensors="pt")
    assert torch.isfinite(export(**ids).logits).all()


def test_a_restart_resumes_a_quantized_run_from_its_adapters_only_checkpoint(tmp_path, base_folder):
    # The checkpoint holds the adapters (and the bitsandbytes constants of the frozen base's state dict);
    # a restart loads it into a freshly quantized base.
    roles = {"actor": {"lora": {"rank": 4, "quantization": "4bit"}, "deepspeed": {"bf16": True}},
             "reference": {"colocate_with": "actor"}}
    config = trainer_config("dpo", model={"path": str(base_folder)}, roles=roles, hyperparameters={"max_steps": 2})
    run = launch(config, tmp_path / "first")
    assert run.ok, run.describe()
    config["hyperparameters"]["max_steps"] = 3
    again = launch(config, tmp_path / "again", checkpoint_dir=run.checkpoint_dir, restart_attempt=1)
    assert again.ok, again.describe()
    assert "resumed from step 2" in again.logs["actor-0"]
    assert math.isfinite(again.metrics()[-1]["loss"])
