"""A LoRA role's frozen base loaded quantized by bitsandbytes (roles.<role>.lora.quantization), as
TRL's ModelConfig (load_in_8bit / load_in_4bit, bnb_4bit_quant_type, use_bnb_nested_quant) and
QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") do it.

    kwargs = bnb_config_kwargs(lora, bf16=..., device=..., bnb_installed=...)  # pure: settings + device
    kwargs = for_this_process(role_config)      # the same for this process (imports bitsandbytes if asked)
    model = load_quantized(load, kwargs, device, gradient_checkpointing=...)  # from_pretrained + kbit prep

bitsandbytes runs its int8 / 4-bit kernels on CUDA, and since 0.46 on a CPU backend too (slow, but the
same code path: CI trains QLoRA on CPU with it). A quantized base asked of a process on another device,
or where the package does not import, is a config error (exit 78) raised by `check` before anything
loads. The base stays frozen; the adapters train in the compute dtype; the merged export folds them into
the UNquantized base (rlhf_trainer.lora.write_export), since merging into 4-bit weights would round them.
"""

from __future__ import annotations

from typing import Any

import torch
from rlhf_contract.config import LoraConfig, RoleConfig

from rlhf_trainer import distributed
from rlhf_trainer.errors import ConfigError

# Devices bitsandbytes' kernels run on: CUDA, and the CPU backend it ships since 0.46.
BNB_DEVICES = ("cuda", "cpu")


def bnb_installed() -> bool:
    """Whether bitsandbytes imports here (an installed but broken package counts as missing)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def bnb_config_kwargs(lora: LoraConfig, *, bf16: bool, device: torch.device, bnb_installed: bool,
                      field: str = "roles.actor.lora.quantization") -> dict[str, Any] | None:
    """`transformers.BitsAndBytesConfig(**kwargs)` for the role's settings; None for quantization none.

    8bit: LLM.int8 weights (load_in_8bit). 4bit: `quant_type` nf4 / fp4 blocks, compute in the role's
    dtype (bfloat16 with deepspeed.bf16, else float32) and stored in uint8, with `double_quant` the
    constants quantized too: TRL's get_quantization_config, whose bnb_4bit_compute_dtype is the model dtype.
    Raises ConfigError naming `field` when bitsandbytes has no kernels for `device` (BNB_DEVICES) or does
    not import.
    """
    if lora.quantization == "none":
        return None
    if device.type not in BNB_DEVICES:
        raise ConfigError(f"{field}: {lora.quantization} loads the base with bitsandbytes, which runs on "
                          f"{' or '.join(BNB_DEVICES)}; this process runs on {device.type} (set quantization none)")
    if not bnb_installed:
        raise ConfigError(f"{field}: {lora.quantization} needs the bitsandbytes package, which does not import "
                          f"in this trainer image (the project's trainer images install it: the `trainer` extra)")
    if lora.quantization == "8bit":
        return {"load_in_8bit": True}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": lora.quant_type,
            "bnb_4bit_compute_dtype": torch.bfloat16 if bf16 else torch.float32,
            "bnb_4bit_use_double_quant": lora.double_quant}


def for_this_process(role: RoleConfig) -> dict[str, Any] | None:
    """bnb_config_kwargs for `role` on this process's device; bitsandbytes is imported (seconds, and
    its warnings) only when the role asks for a quantized base. Raises ConfigError as bnb_config_kwargs."""
    lora = role.lora
    return bnb_config_kwargs(lora, bf16=role.deepspeed.bf16, device=distributed.device(),
                             bnb_installed=lora.quantization != "none" and bnb_installed())


def device_map(device: torch.device) -> dict[str, int | str]:
    """Every module on this rank's device (TRL's get_kbit_device_map): quantized weights cannot move later."""
    if device.type == "cpu":
        return {"": "cpu"}
    return {"": device.index if device.index is not None else torch.cuda.current_device()}


def load_quantized(load: Any, kwargs: dict[str, Any], device: torch.device, *,
                   gradient_checkpointing: bool) -> torch.nn.Module:
    """`load(quantization_config=..., device_map=...)` (models.load_policy / load_reward_model of a model
    folder), then peft's prepare_model_for_kbit_training: the base frozen, norms and head in float32,
    input gradients on for checkpointing. The adapters go on afterwards (rlhf_trainer.lora.with_lora)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    model = load(quantization_config=BitsAndBytesConfig(**kwargs), device_map=device_map(device))
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None)
