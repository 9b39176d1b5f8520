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


# ---- old log-probs from the sampling pass (hyperparameters.oldLogProbs: sampling) ----------------


def recomputed(model, roll, temperature):
    """The log-probs the forward path gives for the same rollout (collect_experience's default)."""
    from rlhf_trainer.forward import chunked_token_logprobs

    R = roll.action_mask.shape[1]
    return chunked_token_logprobs(model, roll.sequences, roll.attention_mask, chunk_size=64,
                                  temperature=temperature, response_length=R) * roll.action_mask


@pytest.mark.parametrize("seed", range(4))
def test_sampling_log_probs_are_the_forwards_log_probs(tok, seed):
    # Prompts of different lengths (left padding), chunks of 2 rows that stop at different lengths,
    # and a temperature that is not 1: each must leave the recorded log-probs equal to a forward's.
    model = models.load_policy("tiny://llama", seed=seed).eval()
    hp = Hyperparameters(max_new_tokens=7, temperature=0.7, inference_chunk_size=2, old_log_probs="sampling")
    stops = (tok.eos_token_id, *range(40, 60))  # frequent stops: rows and chunks end at different lengths
    torch.manual_seed(seed)
    roll = generate(model, tok, rows(tok, ["3+4=", "12+30=", "Repeat the word.", "7", "1+1="]), hp, stops)
    assert roll.sampled_logprobs is not None and roll.sampled_logprobs.shape == roll.action_mask.shape
    torch.testing.assert_close(roll.sampled_logprobs, recomputed(model, roll, 0.7), atol=2e-5, rtol=1e-5)
    assert (roll.sampled_logprobs[roll.action_mask.bool()] < 0).all()  # real log-probs, not the zero padding


def test_the_forward_path_keeps_no_sampling_log_probs(tok):
    model = models.load_policy("tiny://llama", seed=0).eval()
    assert Hyperparameters().old_log_probs == "forward"
    assert sample(model, tok, Hyperparameters(max_new_tokens=3), (tok.eos_token_id,)).sampled_logprobs is None


def test_multi_turn_sampling_log_probs_are_the_forwards_log_probs(tok):
    from rlhf_trainer.chat import Renderer
    from rlhf_trainer.multiturn import FixedInstruction, rollout

    renderer = Renderer(tok, "raw")
    model = models.load_policy("tiny://llama", seed=0).eval()
    prompt_rows = [PromptRow(renderer.prompt_ids(p), False, p, None, f"row {i}") for i, p in enumerate(["1+2=", "22+2="])]
    hp = Hyperparameters(turns=2, max_new_tokens=4, temperature=1.2, old_log_probs="sampling")
    torch.manual_seed(0)
    roll = rollout(model, renderer, prompt_rows, hp, FixedInstruction("Check it."))
    assert (roll.sampled_logprobs[roll.action_mask == 0] == 0).all()  # the environment's tokens are no actions
    torch.testing.assert_close(roll.sampled_logprobs, recomputed(model, roll, 1.2), atol=2e-5, rtol=1e-5)


# ---- prefix sharing in generation (hyperparameters.prefixSharing) ------------------------------------


def count_positions(model):
    """A list that gets the number of token positions of each forward of `model`, and the hook's handle."""
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw["input_ids"].numel()), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("seed", range(4))
def test_a_shared_prompt_prefill_samples_what_the_plain_prefill_samples(tok, seed):
    # GRPO's layout: each prompt 3 times in a row. Prompts of 1-9 tokens (a 1-token prompt has no token
    # in the cached columns), chunks of 5 rows that cut groups, frequent stops, a temperature that is not 1.
    g = torch.Generator().manual_seed(seed)
    prompts = [tuple(torch.randint(3, 200, (n,), generator=g).tolist()) for n in (1, 9, 4, 6)]
    group = [PromptRow(ids, False, f"p{i}", None, f"t:{i}") for i, ids in enumerate(prompts) for _ in range(3)]
    model = models.load_policy("tiny://llama", seed=seed).eval()
    stops = (tok.eos_token_id, *range(40, 60))
    out = {}
    for sharing in (False, True):
        hp = Hyperparameters(max_new_tokens=7, temperature=0.7, inference_chunk_size=5, old_log_probs="sampling",
                             prefix_sharing=sharing)
        calls, handle = count_positions(model)
        torch.manual_seed(seed)
        out[sharing] = generate(model, tok, group, hp, stops), calls
        handle.remove()
    (plain, plain_calls), (shared, shared_calls) = out[False], out[True]
    assert torch.equal(shared.sequences, plain.sequences) and torch.equal(shared.action_mask, plain.action_mask)
    torch.testing.assert_close(shared.sampled_logprobs, plain.sampled_logprobs, atol=2e-5, rtol=1e-5)
    # Chunks take the rows by prompt length (1 1 1 4 4 | 4 6 6 6 9 | 9 9), each padded to its longest:
    # plain prefills of 5 x 4, 5 x 9 and 2 x 9 positions; with sharing the chunks' 2, 3 and 1 distinct
    # prompts' columns but the last (3, 8, 8), then the last column of each row.
    assert plain_calls[0] == 5 * 4 and shared_calls[:2] == [2 * 3, 5]
    assert sum(shared_calls) == sum(plain_calls) - (5 * 4 + 5 * 9 + 2 * 9) + (2 * 3 + 3 * 8 + 1 * 8) + 12


def test_the_shared_prompt_prefill_is_one_forward_whatever_the_rows(tok):
    # ZeRO-3 gathers the parameters in each forward: every rank must run as many, whatever its prompts.
    from rlhf_trainer.forward import shared_prompt_cache

    model = models.load_policy("tiny://llama", seed=0).eval()
    for ids, mask in ((torch.tensor([[5], [5]]), torch.tensor([[1], [1]])),  # one column: nothing to cache
                      (torch.tensor([[0, 5], [6, 7]]), torch.tensor([[0, 1], [1, 1]]))):
        calls, handle = count_positions(model)
        cache = shared_prompt_cache(model, ids, mask)
        handle.remove()
        assert len(calls) == 1
        assert (cache is None) == (ids.shape[1] == 1)
        if cache is not None:
            assert cache.get_seq_length() == ids.shape[1] - 1
