"""LoRA end to end (tiny model, CPU): DPO trains adapters on the actor, the colocated reference is the
actor's own base model with adapters disabled, checkpoints hold only the adapters and their optimizer
state, a restart resumes from them, and the export is a plain model folder (or peft's adapter folder)."""

from __future__ import annotations

import pytest
import torch
from rlhf_trainer import models
from trainer_harness import launch, trainer_config
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow


def lora_config(rank: int, export: str = "merged", max_steps: int = 2) -> dict:
    roles = {"actor": {"lora": {"rank": rank, "alpha": 16.0, "export": export}},
             "reference": {"colocate_with": "actor"}}
    return trainer_config("dpo", roles=roles, hyperparameters={"max_steps": max_steps, "learning_rate": 1e-2},
                          checkpoint={"interval_steps": 1, "keep": 3})


def checkpoint_bytes(run, step: int) -> int:
    return sum(p.stat().st_size for p in (run.checkpoint_dir / f"step-{step}" / "actor").rglob("*") if p.is_file())


def test_dpo_with_lora_shares_the_base_checkpoints_adapters_and_exports_a_plain_model(tmp_path):
    full = launch(trainer_config("dpo", roles={"actor": {}, "reference": {"colocate_with": "actor"}},
                                 hyperparameters={"max_steps": 1}, checkpoint={"interval_steps": 1, "keep": 1}),
                  tmp_path / "full")
    assert full.ok, full.describe()
    run = launch(lora_config(rank=4), tmp_path / "lora")
    assert run.ok, run.describe()
    assert "reference: the actor's base model with its adapters disabled" in run.logs["actor-0"]
    rows = run.metrics()
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and rows[1]["loss"] != rows[0]["loss"]
    # adapters + their Adam moments only: a small share of a full checkpoint
    assert checkpoint_bytes(run, 2) < 0.5 * checkpoint_bytes(full, 1)

    export = run.checkpoint_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert not any("lora" in name for name, _ in model.named_parameters())
    initial = models.load_policy("tiny://llama", seed=0)
    assert any(not torch.equal(p, initial.get_parameter(n)) for n, p in model.named_parameters())

    # a restart resumes from the adapters-only checkpoint
    config = lora_config(rank=4, max_steps=3)
    again = launch(config, tmp_path / "again", checkpoint_dir=run.checkpoint_dir, restart_attempt=1)
    assert again.ok, again.describe()
    assert "resumed from step 2" in again.logs["actor-0"]


def test_adapter_export_is_peft_folder(tmp_path):
    run = launch(lora_config(rank=2, export="adapter", max_steps=1), tmp_path)
    assert run.ok, run.describe()
    export = run.checkpoint_dir / "export"
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    assert (export / "tokenizer_config.json").is_file() and not (export / "model.safetensors").exists()
