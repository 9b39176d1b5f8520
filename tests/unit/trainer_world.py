"""Fixtures for in-process trainer tests: a torch.distributed world of one and a tiny causal LM."""

import pytest
import torch
from rlhf_operator.localexec import free_port


@pytest.fixture(scope="session")
def role_world():
    """A world of one process (DeepSpeed needs one); started once, it lives as long as the session."""
    from rlhf_trainer.distributed import init_role_world

    init_role_world(master_addr="127.0.0.1", master_port=free_port(), rank=0, world_size=1)
    return 0


@pytest.fixture
def tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)
