"""rlhf_trainer.quantization.bnb_config_kwargs: a role's lora settings + the device -> the kwargs of
transformers.BitsAndBytesConfig (TRL's get_quantization_config), or a config error naming the field."""

from __future__ import annotations

import pytest
import torch
from rlhf_contract.config import LoraConfig
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.quantization import bnb_config_kwargs, device_map

GPU = torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("lora", "bf16", "expected"),
    [
        pytest.param(LoraConfig(rank=8), True, None, id="none"),
        pytest.param(LoraConfig(rank=8, quantization="8bit"), True, {"load_in_8bit": True}, id="8bit"),
        pytest.param(LoraConfig(rank=8, quantization="4bit"), True,
                     {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16,
                      "bnb_4bit_use_double_quant": False}, id="4bit-nf4-bf16"),
        pytest.param(LoraConfig(rank=8, quantization="4bit", quant_type="fp4", double_quant=True), False,
                     {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32,
                      "bnb_4bit_use_double_quant": True}, id="4bit-fp4-fp32-double"),
    ],
)
def test_settings_map_to_bitsandbytes_kwargs(lora, bf16, expected):
    assert bnb_config_kwargs(lora, bf16=bf16, device=GPU, bnb_installed=True) == expected


def test_the_kwargs_build_a_bitsandbytes_config():
    # transformers' own class accepts them (it needs no bitsandbytes until a model loads)
    from transformers import BitsAndBytesConfig

    kwargs = bnb_config_kwargs(LoraConfig(rank=8, quantization="4bit", quant_type="fp4"), bf16=True, device=GPU,
                               bnb_installed=True)
    config = BitsAndBytesConfig(**kwargs)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_base_on_a_device_without_bitsandbytes_kernels_is_a_config_error_naming_the_field(quantization):
    lora = LoraConfig(rank=8, quantization=quantization)
    with pytest.raises(ConfigError, match=rf"^roles\.actor\.lora\.quantization: {quantization} .* runs on cuda or "
                                          r"cpu; this process runs on mps"):
        bnb_config_kwargs(lora, bf16=False, device=torch.device("mps"), bnb_installed=True)


def test_a_quantized_base_on_cpu_uses_bitsandbytes_cpu_backend():
    lora = LoraConfig(rank=8, quantization="4bit")
    assert bnb_config_kwargs(lora, bf16=False, device=torch.device("cpu"), bnb_installed=True)["load_in_4bit"]
    assert device_map(torch.device("cpu")) == {"": "cpu"}


def test_a_quantized_base_without_bitsandbytes_is_a_config_error_naming_the_package():
    with pytest.raises(ConfigError, match=r"^roles\.actor\.lora\.quantization: 4bit needs the bitsandbytes package"):
        bnb_config_kwargs(LoraConfig(rank=8, quantization="4bit"), bf16=True, device=GPU, bnb_installed=False)


def test_no_quantization_needs_neither_a_gpu_nor_the_package():
    assert bnb_config_kwargs(LoraConfig(), bf16=False, device=torch.device("cpu"), bnb_installed=False) is None


def test_device_map_puts_the_whole_model_on_the_rank_gpu():
    assert device_map(GPU) == {"": 1}


def test_load_quantized_passes_the_config_and_device_map_and_freezes_the_base():
    # The shell's wiring on CPU: `load` stands for models.load_policy of a folder (the GPU test loads for real).
    from rlhf_trainer import models
    from rlhf_trainer.quantization import load_quantized

    seen = {}

    def load(**kwargs):
        seen.update(kwargs)
        return models.load_policy("tiny://llama", seed=0)

    kwargs = bnb_config_kwargs(LoraConfig(rank=8, quantization="4bit", double_quant=True), bf16=True, device=GPU,
                               bnb_installed=True)
    model = load_quantized(load, kwargs, GPU, gradient_checkpointing=False)
    config = seen["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_use_double_quant and config.bnb_4bit_quant_type == "nf4"
    assert seen["device_map"] == {"": 1}
    assert not any(p.requires_grad for p in model.parameters())  # only adapters, added next, will train
