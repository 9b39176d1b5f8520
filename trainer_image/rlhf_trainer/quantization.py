"""A LoRA role's frozen base loaded quantized by bitsandbytes (roles.<role>.lora.quantization), as
TRL's ModelConfig (load_in_8bit / load_in_4bit, bnb_4bit_quant_type, use_bnb_nested_quant) and
QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") do it.

    kwargs = bnb_config_kwargs(lora, bf16=settings.bf16, device=distributed.device(),
                               bnb_installed=bnb_installed())     # pure: settings + device -> kwargs
    model = load_quantized(path, kwargs, device)                   # the shell: from_pretrained + kbit prep

bitsandbytes' int8 / 4-bit kernels run on CUDA only, and the package is in the CUDA trainer image only
(trainer_image/Dockerfile, the `gpu` extra): a quantized base asked of a CPU process, or of an image
without the package, is a config error (exit 78) raised by `check` before anything loads. The base
stays frozen; the adapters train in the compute dtype; the merged export folds them into the
UNquantized base (rlhf_trainer.lora.write_export), since merging into 4-bit weights would round them.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from rlhf_contract.config import LoraConfig

from rlhf_trainer.errors import ConfigError


def bnb_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def bnb_config_kwargs(lora: LoraConfig, *, bf16: bool, device: torch.device, bnb_installed: bool,
                      field: str = "roles.actor.lora.quantization") -> dict[str, Any] | None:
    """`transformers.BitsAndBytesConfig(**kwargs)` for the role's settings; None for quantization none.

    8bit: LLM.int8 weights (load_in_8bit). 4bit: `quant_type` nf4 / fp4 blocks, compute in the role's
    dtype (bfloat16 with deepspeed.bf16, else float32) and stored in uint8, with `double_quant` the
    constants quantized too: TRL's get_quantization_config, whose bnb_4bit_compute_dtype is the model dtype.
    Raises ConfigError naming `field` when `device` is no CUDA device or bitsandbytes is not installed.
    """
    if lora.quantization == "none":
        return None
    if device.type != "cuda":
        raise ConfigError(f"{field}: {lora.quantization} loads the base with bitsandbytes, which needs a CUDA GPU; "
                          f"this process runs on {device.type} (give the role gpus, or set quantization none)")
    if not bnb_installed:
        raise ConfigError(f"{field}: {lora.quantization} needs the bitsandbytes package, which this trainer image "
                          f"lacks (the CUDA image, trainer_image/Dockerfile, installs it: the `gpu` extra)")
    if lora.quantization == "8bit":
        return {"load_in_8bit": True}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": lora.quant_type,
            "bnb_4bit_compute_dtype": torch.bfloat16 if bf16 else torch.float32,
            "bnb_4bit_use_double_quant": lora.double_quant}


def device_map(device: torch.device) -> dict[str, int]:
    """Every module on this rank's GPU (TRL's get_kbit_device_map): quantized weights cannot move later."""
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
