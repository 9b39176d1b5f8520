"""rlhf_trainer.sampling: rollouts sample at the temperature only, whatever the checkpoint's
generation_config says, and stop at every EOS id of the model."""

from __future__ import annotations

import pytest
import torch
from rlhf_contract.config import Hyperparameters
from rlhf_trainer import models
from rlhf_trainer.algorithms.common import generate
from rlhf_trainer.sampling import sampling_config, stop_token_ids
from rlhf_trainer.tokenized import PromptRow
from transformers import GenerationConfig


class Config:
    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny://llama")


def rows(tok, prompts):
    return [PromptRow(tuple(tok(p)["input_ids"]), False, p, None, f"t:{i}") for i, p in enumerate(prompts)]


def test_stop_ids_are_the_tokenizers_eos_then_every_config_eos(tok):
    llama3_like = (Config(128001), Config([128001, 128008, 128009]))
    assert stop_token_ids(tok, *llama3_like) == (tok.eos_token_id, 128001, 128008, 128009)
    assert stop_token_ids(tok, Config(None)) == (tok.eos_token_id,)


def test_the_sampling_config_switches_off_every_truncation_and_penalty():
    config = sampling_config(temperature=0.7, max_new_tokens=5, stop_ids=[2, 9], pad_token_id=0)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 0, 1.0)
    assert (config.repetition_penalty, config.typical_p, config.min_new_tokens, config.min_length) == (1.0, 1.0, None, 0)
    assert config.eos_token_id == [2, 9]


def sample(model, tok, hp, stop_ids, seed=0):
    torch.manual_seed(seed)
    return generate(model, tok, rows(tok, ["3+4=", "1+2=", "Repeat the word."]), hp, stop_ids)


def test_a_checkpoints_generation_config_does_not_change_what_is_sampled(tok):
    hp = Hyperparameters(max_new_tokens=8, temperature=1.3)
    model = models.load_policy("tiny://llama", seed=0).eval()
    plain = sample(model, tok, hp, (tok.eos_token_id,))
    # What a checkpoint's generation_config.json may hold; each would change the sampled tokens.
    model.generation_config = GenerationConfig(
        repetition_penalty=50.0, top_k=1, top_p=0.1, min_p=0.5, min_new_tokens=8, no_repeat_ngram_size=1,
        suppress_tokens=list(range(10, 60)), temperature=0.01, do_sample=False, bad_words_ids=[[70], [71]],
    )
    hostile = sample(model, tok, hp, (tok.eos_token_id,))
    assert torch.equal(plain.sequences, hostile.sequences)
    assert model.generation_config.repetition_penalty == 50.0  # kept for the export
    other_seed = sample(model, tok, hp, (tok.eos_token_id,), seed=1)
    assert not torch.equal(plain.sequences, other_seed.sequences)  # the comparison can fail


def test_any_stop_id_ends_a_response(tok):
    hp = Hyperparameters(max_new_tokens=6)
    model = models.load_policy("tiny://llama", seed=0).eval()
    every_token = tuple(range(len(tok)))  # whatever is sampled first is a stop token
    roll = sample(model, tok, hp, every_token)
    assert roll.action_mask.sum(-1).tolist() == [1, 1, 1]
    assert not roll.truncated.any()
    never = sample(model, tok, hp, (tok.pad_token_id,))  # padding is never sampled after a real token...
    assert never.action_mask.shape[1] == 6  # ...so each response runs to max_new_tokens
