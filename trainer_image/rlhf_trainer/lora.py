"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") with peft.

    model = with_lora(models.load_policy(path, seed=0), cfg.roles["actor"].lora, classifier=False)
    with adapters_off(model):            # the base model: the reference policy, one copy of the weights
        ref_logits = model(...).logits
    write_export(state, lora_cfg, load_base, tokenizer, folder)   # merged weights, or the adapter alone

Only the adapters (and, for a reward model, its score head) train; the base weights stay frozen, so
the base model with adapters disabled IS the initial policy: a reference colocated with a LoRA actor
is served by the actor's own model (rlhf_trainer.roles.ReferenceService) instead of a second copy.
DeepSpeed checkpoints then hold only the trainable tensors (rlhf_trainer.strategy: frozen parameters
are excluded), and the export folds the adapters into the base (`merged`, a plain model folder that
transformers and vLLM load as is) or writes peft's adapter folder (`adapter`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from rlhf_contract.config import LoraConfig


def target_modules(value: str) -> str | list[str]:
    """`all-linear` (peft's every-linear-layer shorthand, the output layer excepted) or a list of names."""
    value = value.strip()
    return value if value == "all-linear" else [name.strip() for name in value.split(",") if name.strip()]


def with_lora(model: torch.nn.Module, lora: LoraConfig, *, classifier: bool) -> PeftModel:
    """`model` with fresh adapters on its target modules (B initialised to 0: the output is unchanged);
    a classifier (reward model) also trains its score head (peft's SEQ_CLS task)."""
    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_modules(lora.target_modules),
        task_type=TaskType.SEQ_CLS if classifier else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model: adapters disabled for the block (a no-op for a model without adapters)."""
    if not is_lora(model):
        yield
        return
    with model.disable_adapter():
        yield


def write_export(state: dict[str, torch.Tensor], lora: LoraConfig, load_base: Callable[[], torch.nn.Module],
                 *, classifier: bool, folder: Path) -> torch.nn.Module | None:
    """Write the trained adapters in `state` (the PeftModel's full state dict) to `folder`.

    `merged`: a fresh base from `load_base()` (unquantized, whatever roles.actor.lora.quantization
    trained on) gets the adapters, which are folded in; returns that plain
    model, for the caller to save with its tokenizer. `adapter`: peft's adapter_config.json +
    adapter_model.safetensors are written, None is returned.
    """
    model = with_lora(load_base(), lora, classifier=classifier)
    # Only the trained tensors: the fresh base's own weights are the frozen ones (and, for a base that
    # trained quantized, the unquantized originals the adapters are folded into: merging into int8 or
    # 4-bit weights would round the sum).
    trained = {key: value for key, value in state.items() if "lora_" in key or "modules_to_save" in key}
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected or any("lora_" in key or "modules_to_save" in key for key in missing):
        raise RuntimeError(f"the trained state does not fit the adapters: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    if lora.export == "adapter":
        model.save_pretrained(folder)
        return None
    return model.merge_and_unload()
