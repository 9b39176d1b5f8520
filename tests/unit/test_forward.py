"""Selective token log-probs and chunked inference passes against their naive, whole-batch forms.

- logprobs_from_logits == log_softmax(logits / T).gather(labels), values and gradients, for every
  chunking (whole rows, pieces of a row), dtype and temperature;
- chunked passes (actor / reference log-probs, reward scores, critic values, generation) == one pass
  over the whole batch, to float tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rlhf_trainer.forward import (
    chunked,
    chunked_rows,
    chunked_token_logprobs,
    edge_padding,
    row_slices,
    token_logprobs,
)
from rlhf_trainer.losses.utils import entropy_from_logits, logit_chunks, logprobs_from_logits
from trainer_world import role_world, tiny_causal_lm  # noqa: F401 (fixtures)


def upcast(logits):
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def naive_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(upcast(logits) / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(upcast(logits) / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def batch(rows=3, tokens=5, vocab=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, tokens, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (rows, tokens), generator=g)
    return logits, labels


# chunk_elements -> what it exercises, for (3, 5, 11) logits (55 entries per row)
CHUNKINGS = {
    "one chunk": 10**9,
    "two rows per chunk": 110,
    "one row per chunk": 55,
    "pieces of a row (2 positions)": 22,
    "one position per chunk": 1,
}


@pytest.mark.parametrize("name", CHUNKINGS)
def test_logit_chunks_cover_every_entry_once_within_the_budget(name):
    budget = CHUNKINGS[name]
    seen = torch.zeros(3, 5, dtype=torch.long)
    for rows, cols in logit_chunks(3, 5, 11, budget):
        seen[rows, cols] += 1
        assert seen[rows, cols].numel() * 11 <= max(budget, 11)
    assert (seen == 1).all()


@pytest.mark.parametrize("name", CHUNKINGS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logprobs_equal_log_softmax_gather_with_gradients(name, temperature):
    logits, labels = batch()
    weights = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mine = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    out = logprobs_from_logits(mine, labels, temperature, chunk_elements=CHUNKINGS[name])
    want = torch.log_softmax(ref / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_selective_logprobs_pass_gradcheck():
    logits, labels = batch(rows=2, tokens=3, vocab=5)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, labels, 0.5, chunk_elements=5), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits_are_upcast_per_chunk(dtype):
    logits, labels = batch(rows=4, tokens=6, vocab=50, dtype=dtype)
    out = logprobs_from_logits(logits, labels, chunk_elements=60)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logprobs(logits, labels), rtol=1e-5, atol=1e-5)
    z = logits.clone().requires_grad_()
    logprobs_from_logits(z, labels, chunk_elements=60).sum().backward()
    assert z.grad.dtype == dtype  # the gradient is of the logits' own dtype, no float32 copy kept


def test_a_non_contiguous_slice_of_the_logits_is_read_in_place():
    logits, labels = batch(rows=2, tokens=6, vocab=7)
    view = logits[:, :-1]  # as the loops slice the model's output
    assert not view.is_contiguous()
    torch.testing.assert_close(logprobs_from_logits(view, labels[:, 1:], chunk_elements=14),
                               naive_logprobs(view, labels[:, 1:]))


def test_bad_shapes_name_what_was_expected():
    logits, labels = batch()
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        logprobs_from_logits(logits, labels[:, :-1])


@pytest.mark.parametrize("name", CHUNKINGS)
def test_chunked_entropy_equals_the_definition(name):
    logits, _ = batch()
    torch.testing.assert_close(entropy_from_logits(logits, 0.7, chunk_elements=CHUNKINGS[name]),
                               naive_entropy(logits, 0.7), rtol=1e-10, atol=1e-12)


def test_row_slices_and_chunked_concatenate_in_order():
    assert row_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert chunked(lambda s: torch.arange(5)[s] * 10, rows=5, chunk_size=2).tolist() == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="at least 1"):
        row_slices(5, 0)


def row_summary(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, T) -> (b, 2): what a row's real tokens are and in which order, whatever its padding."""
    rank = mask.cumsum(-1) * mask
    return torch.stack([(ids * rank * mask).sum(-1), mask.sum(-1)], dim=-1)


@settings(max_examples=80, deadline=None)
@given(st.data(), st.integers(1, 9), st.integers(1, 10), st.integers(1, 7), st.sampled_from(["left", "right"]))
def test_chunked_rows_drop_each_chunks_common_padding_and_answer_in_order(data, rows, width, chunk_size, side):
    real = data.draw(st.lists(st.integers(1, width), min_size=rows, max_size=rows))
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(real):  # n real tokens after the padding (left) or before it (right)
        mask[i, slice(width - n, None) if side == "left" else slice(0, n)] = 1
    ids = torch.randint(1, 50, (rows, width)) * mask
    seen = []

    def fn(chunk_ids, chunk_mask):
        seen.append(chunk_mask)
        return row_summary(chunk_ids, chunk_mask)

    out = chunked_rows(fn, ids, mask, chunk_size=chunk_size, side=side)
    assert torch.equal(out, row_summary(ids, mask))
    assert len(seen) == len(row_slices(rows, chunk_size)) and sum(m.shape[0] for m in seen) == rows
    edge = 0 if side == "left" else -1
    assert all(m[:, edge].any() for m in seen)  # no chunk keeps a column of padding only on its trimmed side
    assert edge_padding(mask, side).tolist() == [width - n for n in real]


# ---- passes of real (tiny) models -----------------------------------------------------------------


def left_padded(rows=5, width=9, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    for i in range(rows):
        mask[i, : i % 4] = 0  # 0..3 left pads
    return ids.masked_fill(mask == 0, 0), mask


def test_token_logprobs_of_the_response_equal_the_tail_of_all_tokens(tiny_causal_lm):  # noqa: F811
    ids, mask = left_padded()
    model = tiny_causal_lm.eval()
    with torch.no_grad():
        full, full_logits = token_logprobs(model, ids, mask, temperature=0.7)
        tail, tail_logits = token_logprobs(model, ids, mask, temperature=0.7, response_length=3)
        # A plain callable hides the module: the model computes every position's logits, sliced after.
        via_callable, _ = token_logprobs(lambda **kw: model(**kw), ids, mask, temperature=0.7, response_length=3)
    assert full.shape == (5, 8) and tail.shape == (5, 3) and tail_logits.shape == (5, 3, 128)
    torch.testing.assert_close(tail, full[:, -3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_callable, tail, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail_logits, full_logits[:, -3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, naive_logprobs(full_logits, ids[:, 1:], 0.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 8])
def test_chunked_logprobs_equal_one_pass(tiny_causal_lm, chunk_size):  # noqa: F811
    from rlhf_trainer.roles import ReferenceService

    ids, mask = left_padded()
    model = tiny_causal_lm.eval()
    with torch.no_grad():
        whole = token_logprobs(model, ids, mask, temperature=0.7, response_length=4)[0]
    torch.testing.assert_close(
        chunked_token_logprobs(model, ids, mask, chunk_size=chunk_size, temperature=0.7, response_length=4),
        whole, rtol=1e-5, atol=1e-5)
    service = ReferenceService(model, 0.7, chunk_size=chunk_size)
    out, _ = service.handle("logprobs", {"input_ids": ids, "attention_mask": mask}, {"response_length": 4})
    torch.testing.assert_close(out["logprobs"], whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_chunked_reward_scores_equal_one_pass(chunk_size):
    from rlhf_trainer import models
    from rlhf_trainer.chat import Renderer
    from rlhf_trainer.roles import RewardService

    tok = models.load_tokenizer("tiny://llama")
    rm = models.load_reward_model("tiny://llama", seed=0).eval()
    prompts = ["1+2=", "3+4=", "0+0=", "4+4=", "2+1="]
    responses = ["3", "seven", "0", "8 is the sum", ""]
    meta = {"prompts": prompts, "responses": responses}
    service = RewardService(rm, Renderer(tok, "auto"), max_prompt_length=16, max_length=32, chunk_size=chunk_size)
    scores = service.handle("score", {}, meta)[0]["scores"]
    whole = RewardService(rm, Renderer(tok, "auto"), max_prompt_length=16, max_length=32, chunk_size=len(prompts))
    assert scores.shape == (5,)
    assert len(set(scores.tolist())) == 5  # different rows, different scores: the rows were not mixed up
    torch.testing.assert_close(scores, whole.handle("score", {}, meta)[0]["scores"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunked_critic_values_equal_one_pass(role_world, chunk_size):  # noqa: F811
    from rlhf_contract.config import DeepSpeedConfig
    from rlhf_trainer import models
    from rlhf_trainer.finite import NonFiniteGuard
    from rlhf_trainer.roles import CriticService
    from rlhf_trainer.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(models.load_value_model("tiny://llama", seed=0), DeepSpeedConfig(zero_stage=0),
                                 learning_rate=1e-3, micro_batch_size=2, grad_accum=1)
    ids, mask = left_padded(vocab=100)
    critic = CriticService(strategy, micro_batch_size=2, chunk_size=chunk_size, value_clip_range=0.2,
                           normaliser=lambda n: n, guard=NonFiniteGuard("fail"))
    values = critic.handle("values", {"input_ids": ids, "attention_mask": mask}, {"response_length": 3})[0]["values"]
    with torch.no_grad():
        whole = critic.values(ids, mask, 3)
    assert values.shape == (5, 3)
    torch.testing.assert_close(values, whole, rtol=1e-5, atol=1e-5)


class ScriptedGenerator:
    """Stands in for a causal LM's generate(): returns the given responses (per call, in order)."""

    def __init__(self, responses):
        self.responses, self.calls = list(responses), []
        self.generation_config = None  # set aside by sampling.only_these_settings during the calls

    def generate(self, *, input_ids, attention_mask, synced_gpus, generation_config, **_):
        self.calls.append((input_ids.shape[0], synced_gpus))
        return torch.cat([input_ids, self.responses.pop(0)], dim=1)


def test_generation_in_chunks_pads_shorter_chunks_after_their_eos():
    from rlhf_contract.config import Hyperparameters
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.common import generate
    from rlhf_trainer.tokenized import PromptRow

    tok = models.load_tokenizer("tiny://llama")
    eos, pad, x = tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("7")
    rows = [PromptRow(tok(p)["input_ids"], False, p, None, "") for p in ("1+1=", "2+2=", "3+3=")]
    # Chunk 1 stopped after 2 tokens (both rows ended), chunk 2 ran to max_new_tokens = 4.
    gen = ScriptedGenerator([torch.tensor([[x, eos], [eos, pad]]), torch.tensor([[x, x, x, x]])])
    hp = Hyperparameters(inference_chunk_size=2, max_new_tokens=4, max_prompt_length=8)
    roll = generate(gen, tok, rows, hp, (eos,), synced_gpus=True)
    assert gen.calls == [(2, True), (1, True)]
    assert roll.sequences.shape[1] == roll.attention_mask.shape[1] == len(rows[0].ids) + 4
    assert roll.action_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert roll.truncated.tolist() == [False, False, True]
    assert roll.responses == ["7", "", "7777"]
    assert roll.sequences[0, -2:].tolist() == [pad, pad]


class LengthEcho:
    """Stands in for generate(): answers each row with one token naming its prompt's length, then eos."""

    def __init__(self, eos: int):
        self.eos, self.widths, self.generation_config = eos, [], None

    def generate(self, *, input_ids, attention_mask, **_):
        self.widths.append((input_ids.shape[1], attention_mask.sum(1).tolist()))
        said = torch.stack([100 + attention_mask.sum(1), torch.full_like(attention_mask[:, 0], self.eos)], dim=1)
        return torch.cat([input_ids, said], dim=1)


def test_generation_in_chunks_pads_each_chunk_to_its_own_longest_prompt_and_answers_in_order():
    """Ragged prompts over several chunks: each chunk holds prompts of like length, padded only to its
    own longest (no prefill or KV cache over padding for another chunk's long prompt), and each row
    gets its own response back."""
    from rlhf_contract.config import Hyperparameters
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.common import generate
    from rlhf_trainer.tokenized import PromptRow

    tok = models.load_tokenizer("tiny://llama")
    lengths = [9, 2, 7, 2, 3, 9, 4]
    rows = [PromptRow([5] * n, False, str(n), None, "") for n in lengths]
    gen = LengthEcho(tok.eos_token_id)
    roll = generate(gen, tok, rows, Hyperparameters(inference_chunk_size=2, max_new_tokens=4), (tok.eos_token_id,))
    assert [width for width, _ in gen.widths] == [2, 4, 9, 9]  # padded to the batch's longest: 9, 9, 9, 9
    assert all(width == max(real) for width, real in gen.widths)
    first_token = roll.sequences[:, max(lengths)]
    assert first_token.tolist() == [100 + n for n in lengths]
    assert roll.attention_mask[:, :max(lengths)].sum(1).tolist() == lengths


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), max_size=12))
def test_length_grouped_order_is_a_stable_sort_by_length(lengths):
    from rlhf_trainer.algorithms.common import length_grouped_order

    order = length_grouped_order(lengths)
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths)
    for a, b in zip(order, order[1:], strict=False):
        assert lengths[a] < lengths[b] or a < b  # one length: the callers' order (a GRPO group stays together)


def test_dpo_response_columns_give_the_same_sequence_logprobs_as_every_column():
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.common import encode_pairs
    from rlhf_trainer.algorithms.dpo import response_columns
    from rlhf_trainer.losses.dpo import preference_logprobs
    from rlhf_trainer.tokenized import PairRow

    tok = models.load_tokenizer("tiny://llama")
    model = models.load_policy("tiny://llama", seed=0).eval()

    def ids(text, special=True):
        return tok(text, add_special_tokens=special)["input_ids"]

    pairs = [("1+2=", "3", "4"), ("12+30=", "42", "forty-two"), ("9=", "nine", "8")]
    rows = [PairRow(ids(p), ids(c, False) + [tok.eos_token_id], ids(r, False) + [tok.eos_token_id], False, "")
            for p, c, r in pairs]
    batch = encode_pairs(rows, tok.pad_token_id)
    ids_, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    R = response_columns(loss_mask)
    assert R < ids_.shape[1] - 1  # the prompts' columns are skipped
    assert loss_mask[:, :-R].sum() == 0  # and hold no response token
    with torch.no_grad():
        every = token_logprobs(model, ids_, attn)[0]
        tail = token_logprobs(model, ids_, attn, response_length=R)[0]
    for loss_type in ("sigmoid", "ipo"):  # summed, and token-averaged (IPO)
        torch.testing.assert_close(preference_logprobs(tail, loss_mask, loss_type),
                                   preference_logprobs(every, loss_mask, loss_type), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(preference_logprobs(every, loss_mask, "sigmoid"),
                               (every * loss_mask[:, 1:]).sum(-1), rtol=1e-5, atol=1e-5)
    assert response_columns(torch.tensor([[1, 1, 1]])) == 2  # never token 0


# ---- prefix sharing (hyperparameters.prefixSharing) -----------------------------------------------


def random_pairs(seed, vocab=200, pairs=4):
    """PairRows of random lengths: prompts 1-9 tokens, responses 1-6, ids of the tiny vocabulary."""
    from rlhf_trainer.tokenized import PairRow

    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return tuple(torch.randint(3, vocab, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist())

    return [PairRow(ids(1, 9), ids(1, 6), ids(1, 6), False, f"pair {i}") for i in range(pairs)]


@pytest.mark.parametrize("seed", range(6))
def test_prefix_shared_logprobs_and_gradients_equal_the_plain_forwards(seed):
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.common import encode_pairs
    from rlhf_trainer.algorithms.dpo import SHARED_KEYS, encode_shared_prompt, response_columns
    from rlhf_trainer.forward import shared_prompt_logprobs
    from rlhf_trainer.losses.dpo import preference_logprobs

    pairs = random_pairs(seed)
    model = models.load_policy("tiny://llama", seed=seed).train()  # dropout is 0: train mode, as in the update
    plain = encode_pairs(pairs, 0)
    R = response_columns(plain["loss_mask"])
    shared = encode_shared_prompt(pairs, 0)
    results = []
    for forward in ("plain", "shared"):
        model.zero_grad()
        if forward == "plain":
            logprobs = token_logprobs(model, plain["input_ids"], plain["attention_mask"], response_length=R,
                                      temperature=0.9)[0]
            mask = plain["loss_mask"]
        else:
            logprobs = shared_prompt_logprobs(model, *(shared[k] for k in SHARED_KEYS), torch.arange(4).repeat(2),
                                              temperature=0.9)[0]
            mask = shared["response_mask"]
        summed, averaged = preference_logprobs(logprobs, mask, "sigmoid"), preference_logprobs(logprobs, mask, "ipo")
        (summed.sum() + (summed[:4] - summed[4:]).square().sum()).backward()  # a loss that mixes the rows
        results.append((summed.detach(), averaged.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (s_plain, a_plain, g_plain), (s_shared, a_shared, g_shared) = results
    torch.testing.assert_close(s_shared, s_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_shared, a_plain, rtol=1e-5, atol=1e-5)
    for name, grad in g_plain.items():
        # float32 sums in another order: a tolerance on the scale of the whole tensor's gradient
        scale = max(float(grad.abs().max()), 1.0)
        torch.testing.assert_close(g_shared[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # fewer token positions: each prompt once
    assert shared["prompt_mask"].sum() + shared["response_mask"].sum() < plain["attention_mask"].sum()


def test_cached_prefix_sharing_refuses_a_model_that_keeps_no_cache():
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.dpo import SHARED_KEYS, encode_shared_prompt
    from rlhf_trainer.errors import ConfigError
    from rlhf_trainer.forward import cached_shared_logprobs

    model = models.load_policy("tiny://llama", seed=0).train()
    model.gradient_checkpointing_enable()  # transformers drops the cache in each checkpointed layer
    shared = encode_shared_prompt(random_pairs(0), 0)
    with pytest.raises(ConfigError, match="hyperparameters.prefixSharing: .* nor kept a key/value cache"):
        cached_shared_logprobs(model, *(shared[k] for k in SHARED_KEYS), torch.arange(4).repeat(2))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("path", ["masked", "cached"])
def test_both_prefix_sharing_paths_equal_the_plain_forward(seed, path):
    # shared_prompt_logprobs takes the one-forward masked path when the model honours a 4-D mask, the
    # cached one otherwise: both must give the plain forward's log-probs and gradients.
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.dpo import SHARED_KEYS, encode_shared_prompt
    from rlhf_trainer.forward import cached_shared_logprobs, masked_shared_logprobs, shared_mask_honoured

    model = models.load_policy("tiny://llama", seed=seed).train()
    assert shared_mask_honoured(model)
    pairs = random_pairs(seed)
    shared = encode_shared_prompt(pairs, 0)
    index = torch.arange(len(pairs)).repeat(2)
    fn = masked_shared_logprobs if path == "masked" else cached_shared_logprobs
    model.zero_grad()
    logprobs = fn(model, *(shared[k] for k in SHARED_KEYS), index)[0]
    (logprobs * shared["response_mask"]).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rows = [torch.tensor(p.prompt + r) for p in pairs for r in (p.chosen, p.rejected)]
    expected = []
    for row, response in zip(rows, [r for p in pairs for r in (p.chosen, p.rejected)], strict=True):
        lp = token_logprobs(model, row[None], torch.ones(1, len(row), dtype=torch.long),
                            response_length=len(response))[0][0]
        expected.append(lp)
        lp.sum().backward()
    order = [2 * i for i in range(len(pairs))] + [2 * i + 1 for i in range(len(pairs))]  # chosen rows, then rejected
    for n, i in enumerate(order):
        R = len(expected[i])
        torch.testing.assert_close(logprobs[n, :R], expected[i], rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        scale = max(float(p.grad.abs().max()), 1.0)
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("seed", range(3))
def test_prefix_sharing_runs_under_gradient_checkpointing(seed):
    # The one-forward path needs no cache: checkpointed layers recompute it and give the same gradients.
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.dpo import SHARED_KEYS, encode_shared_prompt
    from rlhf_trainer.forward import shared_prompt_logprobs

    shared = encode_shared_prompt(random_pairs(seed), 0)
    grads = []
    for checkpointing in (False, True):
        model = models.load_policy("tiny://llama", seed=seed).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        logprobs = shared_prompt_logprobs(model, *(shared[k] for k in SHARED_KEYS), torch.arange(4).repeat(2))[0]
        (logprobs * shared["response_mask"]).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_mask_is_refused_by_a_model_that_ignores_a_custom_mask():
    # An attention kernel that takes no custom mask (flash attention) lets the second response see the
    # first: the check must say no, and shared_prompt_logprobs then runs the cached path.
    from rlhf_trainer import models
    from rlhf_trainer.forward import shared_mask_honoured

    model = models.load_policy("tiny://llama", seed=0)
    inner = model.model.forward

    def forward(*args, attention_mask=None, **kwargs):  # drops any 4-D mask: plain causal attention
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return inner(*args, attention_mask=attention_mask, **kwargs)

    model.model.forward = forward
    assert not shared_mask_honoured(model)
    assert shared_mask_honoured(models.load_policy("tiny://llama", seed=0))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=7), st.integers(1, 4), st.integers(1, 3), st.data())
def test_prefix_shared_rows_let_each_response_see_its_prompt_and_itself_only(owners, P, R, data):
    from rlhf_trainer.forward import prefix_shared_rows

    U = max(owners) + 1
    index = torch.tensor(owners)
    prompt_len = [data.draw(st.integers(1, P)) for _ in range(U)]
    response_len = [data.draw(st.integers(1, R)) for _ in owners]
    prompt_mask = torch.tensor([[0] * (P - n) + [1] * n for n in prompt_len])
    response_mask = torch.tensor([[1] * n + [0] * (R - n) for n in response_len])
    prompt_ids = torch.arange(U * P).view(U, P) + 100
    response_ids = torch.arange(len(owners) * R).view(-1, R) + 1000
    rows = prefix_shared_rows(prompt_ids, prompt_mask, response_ids, response_mask, index)
    sees = rows["attention_mask"][:, 0] == 0
    ids, positions, predictors = rows["input_ids"], rows["position_ids"], rows["predictors"]
    for n, u in enumerate(owners):
        # the tokens a response's last real token sees: its prompt's real tokens, then its own, in order
        where = (ids[u] == response_ids[n, response_len[n] - 1]).nonzero()[0, 0]
        seen = ids[u][sees[u, where]].tolist()
        assert seen == prompt_ids[u, P - prompt_len[u]:].tolist() + response_ids[n, :response_len[n]].tolist()
        # positions go on from the prompt; the predictor of token j holds token j - 1 (the prompt's last for 0)
        columns = [int((ids[u] == t).nonzero()[0, 0]) for t in response_ids[n, :response_len[n]].tolist()]
        assert positions[u, columns].tolist() == list(range(prompt_len[u], prompt_len[u] + response_len[n]))
        assert int(predictors[n, 0]) == P - 1
        assert predictors[n, 1:response_len[n]].tolist() == columns[:-1]
    assert bool(sees.diagonal(dim1=1, dim2=2).all())  # every query has a key: no all-masked softmax row


@pytest.mark.parametrize("seed", range(4))
def test_rollout_logprobs_share_each_distinct_prompt_and_equal_the_plain_forward(seed):
    # GRPO's layout: each prompt `group` times in consecutive rows, left-padded prompts, right-padded
    # responses of different lengths; a micro-batch may cut a group.
    from rlhf_trainer import models
    from rlhf_trainer.data import pad_left, pad_right
    from rlhf_trainer.forward import rollout_logprobs

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (3,), generator=g).tolist()
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths for _ in range(3)][1:]  # 8 rows
    responses = [torch.randint(3, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                 for _ in prompts]
    left, right = pad_left(prompts, 0), pad_right([[]] * len(prompts), responses, 0)
    ids = torch.cat([left["input_ids"], right["input_ids"]], 1)
    mask = torch.cat([left["attention_mask"], right["attention_mask"]], 1)
    R = right["input_ids"].shape[1]
    model = models.load_policy("tiny://llama", seed=seed).train()
    out = {}
    for sharing in (False, True):
        model.zero_grad()
        logprobs, logits = rollout_logprobs(model, ids, mask, response_length=R, temperature=0.8, prefix_sharing=sharing)
        (logprobs * right["attention_mask"]).sum().backward()
        out[sharing] = (logprobs.detach() * right["attention_mask"], logits.shape,
                        {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    assert out[True][1] == out[False][1] == (8, R, len(models.load_tokenizer("tiny://llama")))
    for name, grad in out[False][2].items():
        scale = max(float(grad.abs().max()), 1.0)
        torch.testing.assert_close(out[True][2][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


# ---- padding-free forwards (hyperparameters.paddingFree) ------------------------------------------


def uneven_rows(seed, rows=6, vocab=200):
    """Rows of random lengths in one of the trainer's two layouts, drawn from `seed`: rollout rows (left-padded
    prompts of 1-7 tokens, right-padded responses of 1-5: an (ids, mask, R) triple) or encode_pairs' rows
    (prompt + response right-padded together, R from response_columns)."""
    from rlhf_trainer.algorithms.dpo import response_columns
    from rlhf_trainer.data import pad_left, pad_right

    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()

    prompts, responses = [ids(1, 7) for _ in range(rows)], [ids(1, 5) for _ in range(rows)]
    if seed % 2:
        left, right = pad_left(prompts, 0), pad_right([[]] * rows, responses, 0)
        return (torch.cat([left["input_ids"], right["input_ids"]], 1),
                torch.cat([left["attention_mask"], right["attention_mask"]], 1), right["input_ids"].shape[1])
    batch = pad_right(prompts, responses, 0)
    return batch["input_ids"], batch["attention_mask"], response_columns(batch["loss_mask"])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("all_tokens", [False, True])
def test_padding_free_logprobs_logits_and_gradients_equal_the_padded_forward(seed, all_tokens):
    from rlhf_trainer import models

    ids, mask, R = uneven_rows(seed)
    R = 0 if all_tokens else R
    model = models.load_policy("tiny://llama" if seed % 4 < 2 else "tiny://qwen2", seed=seed).train()
    out = {}
    for padding_free in (False, True):
        model.zero_grad()
        logprobs, logits = token_logprobs(model, ids, mask, temperature=0.8, response_length=R, padding_free=padding_free)
        predicted = (mask[:, 1:] * mask[:, :-1])[:, -logprobs.shape[1]:].bool()  # real tokens after real ones
        (logprobs * predicted).sum().backward()
        out[padding_free] = (logprobs.detach(), logits.detach(), predicted,
                             {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp, lg, predicted, grads), (lp_free, lg_free, _, grads_free) = out[False], out[True]
    assert lp_free.shape == lp.shape and lg_free.shape == lg.shape
    torch.testing.assert_close(lp_free[predicted], lp[predicted], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg_free[predicted], lg[predicted], rtol=1e-4, atol=1e-4)
    assert (lp_free[~predicted] == 0).all() and (lg_free[~predicted] == 0).all()
    for name, grad in grads.items():
        scale = max(float(grad.abs().max()), 1.0)
        torch.testing.assert_close(grads_free[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_padding_free_chunked_and_rollout_passes_equal_the_padded_ones():
    from rlhf_trainer import models
    from rlhf_trainer.forward import rollout_logprobs

    ids, mask, R = uneven_rows(1, rows=7)
    model = models.load_policy("tiny://llama", seed=1).eval()
    plain = chunked_token_logprobs(model, ids, mask, chunk_size=3, response_length=R)
    free = chunked_token_logprobs(model, ids, mask, chunk_size=3, response_length=R, padding_free=True)
    rollout = rollout_logprobs(model, ids, mask, response_length=R, padding_free=True)[0].detach()
    real = mask[:, -R:].bool()
    torch.testing.assert_close(free[real], plain[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout[real], plain[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_contiguous_rows_is_true_exactly_for_masks_without_holes(seed):
    from rlhf_trainer.forward import contiguous_rows

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(4, 6, generator=g) < 0.6).long()
    holes = any((row.nonzero().max() - row.nonzero().min() + 1) != row.sum() for row in mask if row.any())
    empty = not bool(mask.any(-1).all())
    assert contiguous_rows(mask) == (not holes and not empty)


def test_a_mask_with_holes_is_run_padded_with_the_same_result():
    from rlhf_trainer import models

    model = models.load_policy("tiny://llama", seed=0).eval()
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # a hole: cannot be packed row by row
    torch.testing.assert_close(token_logprobs(model, ids, mask, padding_free=True)[0],
                               token_logprobs(model, ids, mask)[0])


class MixesRows(torch.nn.Module):
    """A causal LM that builds its own all-ones attention mask, so packed rows would attend to each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def test_padding_free_refuses_a_model_that_mixes_packed_rows():
    from rlhf_trainer import models
    from rlhf_trainer.errors import ConfigError
    from rlhf_trainer.forward import packing_honoured

    model = MixesRows(models.load_policy("tiny://llama", seed=0))
    ids, mask, R = uneven_rows(0)
    assert packing_honoured(models.load_policy("tiny://qwen2", seed=0))
    with pytest.raises(ConfigError, match=r"hyperparameters\.paddingFree: MixesRows lets the tokens of packed rows"):
        token_logprobs(model, ids, mask, response_length=R, padding_free=True)


@pytest.mark.parametrize("seed", range(6))
def test_padding_free_critic_values_and_gradients_equal_the_padded_forward(seed):
    # The PPO critic (models.ValueModel) runs its backbone packed: values at real tokens and every
    # parameter's gradient as padded, in both row layouts, Llama and Qwen2.
    from rlhf_trainer import models
    from rlhf_trainer.data import position_ids_from_mask

    ids, mask, _ = uneven_rows(seed)
    critic = models.load_value_model("tiny://llama" if seed % 4 < 2 else "tiny://qwen2", seed=seed).train()
    real = mask.bool()
    out = {}
    for padding_free in (False, True):
        critic.zero_grad()
        values = critic(ids, mask, position_ids_from_mask(mask), padding_free=padding_free)
        (values * real * torch.linspace(-1, 1, ids.shape[1])).sum().backward()  # every position its own weight
        out[padding_free] = values.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()}
    (values, grads), (values_free, grads_free) = out[False], out[True]
    torch.testing.assert_close(values_free[real], values[real], rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        scale = max(float(grad.abs().max()), 1.0)
        torch.testing.assert_close(grads_free[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_padding_free_reward_scores_equal_the_padded_forward(seed):
    # The reward model pools the row's rightmost token that is not the pad id (Hugging Face's sequence
    # classifiers); row 0 ends in a real pad id (a pad token that is also EOS), so it pools the token before.
    from rlhf_trainer import models
    from rlhf_trainer.forward import sequence_scores

    model = models.load_reward_model("tiny://llama" if seed % 4 < 2 else "tiny://qwen2", seed=seed).eval()
    pad = model.config.pad_token_id
    ids, mask, _ = uneven_rows(seed)
    ids = ids.masked_fill(mask == 0, pad)
    ids[0, int(mask[0].nonzero().max())] = pad
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(model, ids, mask, padding_free=True), sequence_scores(model, ids, mask),
                                   rtol=1e-5, atol=1e-5)


def test_padding_free_refuses_a_critic_whose_backbone_mixes_packed_rows():
    from rlhf_trainer import models
    from rlhf_trainer.errors import ConfigError

    critic = models.load_value_model("tiny://llama", seed=0)
    critic.backbone = MixesRows(critic.backbone)
    ids, mask, _ = uneven_rows(0)
    with pytest.raises(ConfigError, match=r"hyperparameters\.paddingFree: MixesRows lets the tokens of packed rows"):
        critic(ids, mask, padding_free=True)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_reference_log_probs_of_side_by_side_pairs_with_shared_prompts_equal_the_plain_rows(seed, chunk_size):
    # The DPO reference's prefix-shared call: pairs side by side in rollout layout, chunked, put back.
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.common import encode_pairs
    from rlhf_trainer.algorithms.dpo import encode_shared_prompt, response_columns, shared_rows
    from rlhf_trainer.losses.dpo import preference_logprobs
    from rlhf_trainer.roles import ReferenceService

    pairs = random_pairs(seed)
    reference = ReferenceService(models.load_policy("tiny://llama", seed=seed), 1.0, chunk_size=chunk_size)
    plain = encode_pairs(pairs, 0)
    R = response_columns(plain["loss_mask"])
    expected = preference_logprobs(reference.handle("logprobs", {k: plain[k] for k in ("input_ids", "attention_mask")},
                                                    {"response_length": R})[0]["logprobs"], plain["loss_mask"], "sigmoid")
    rows, mask, order = shared_rows(encode_shared_prompt(pairs, 0))
    assert (rows["input_ids"][0::2, :-mask.shape[1]] == rows["input_ids"][1::2, :-mask.shape[1]]).all()  # side by side
    side_by_side = reference.handle("logprobs", rows, {"response_length": mask.shape[1], "prefix_sharing": True})[0]
    logprobs = torch.empty_like(side_by_side["logprobs"])
    logprobs[order] = side_by_side["logprobs"]
    torch.testing.assert_close(preference_logprobs(logprobs, mask, "sigmoid"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12])
def test_chunked_prefix_shared_rollout_logprobs_equal_the_plain_pass(chunk_size):
    # A GRPO batch: 3 prompts x 4 samples, chunks that cut groups.
    from rlhf_trainer import models
    from rlhf_trainer.data import pad_left, pad_right

    g = torch.Generator().manual_seed(chunk_size)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (2, 7, 4) for _ in range(4)]
    responses = [torch.randint(3, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                 for _ in prompts]
    left, right = pad_left(prompts, 0), pad_right([[]] * len(prompts), responses, 0)
    ids = torch.cat([left["input_ids"], right["input_ids"]], 1)
    mask = torch.cat([left["attention_mask"], right["attention_mask"]], 1)
    R = right["input_ids"].shape[1]
    model = models.load_policy("tiny://qwen2", seed=chunk_size).eval()
    plain = chunked_token_logprobs(model, ids, mask, chunk_size=chunk_size, response_length=R, temperature=0.7)
    shared = chunked_token_logprobs(model, ids, mask, chunk_size=chunk_size, response_length=R, temperature=0.7,
                                    prefix_sharing=True)
    real = right["attention_mask"].bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=1e-5, atol=1e-5)


def test_a_model_with_a_sliding_window_takes_the_cached_path(monkeypatch):
    # A custom mask would let a token see past the model's sliding window; the rule reads the config alone,
    # so ZeRO-3 ranks whose rows differ take the same path.
    from rlhf_trainer import forward, models
    from rlhf_trainer.algorithms.dpo import SHARED_KEYS, encode_shared_prompt

    shared = encode_shared_prompt(random_pairs(0), 0)
    taken = []
    monkeypatch.setattr(forward, "shared_mask_honoured", lambda model: True)
    monkeypatch.setattr(forward, "prefix_sharing_costs", lambda *a: (0, 0))
    monkeypatch.setattr(forward, "masked_shared_logprobs", lambda *a, **k: taken.append("masked") or (None, None))
    monkeypatch.setattr(forward, "cached_shared_logprobs", lambda *a, **k: taken.append("cached") or (None, None))
    for window, used, path in ((None, None, "masked"), (4096, None, "cached"), (4096, True, "cached"),
                               (4096, False, "masked")):  # Qwen2's configs: a window, not used
        model = models.load_policy("tiny://llama", seed=0)
        model.config.sliding_window = window
        if used is not None:
            model.config.use_sliding_window = used
        forward.shared_prompt_logprobs(model, *(shared[k] for k in SHARED_KEYS), torch.arange(4).repeat(2))
        assert taken.pop() == path, (window, used)


def test_prefix_sharing_costs_favour_one_forward_for_pairs_and_the_cache_for_many_long_responses():
    from rlhf_trainer.forward import prefix_sharing_costs

    # DPO's pairs (the bench's short and long prompts at SmolLM2-135M's width, dpo.yaml's 2048-token rows
    # at Llama-3.1-8B's): the one forward costs what the two do, plus a few attention pairs
    for d, P, R in ((576, 5, 3), (576, 101, 3), (4096, 1024, 1024)):
        masked, cached = prefix_sharing_costs(d, 8, P, 16, R, 2)
        assert masked <= 1.1 * cached, (d, P, R)
    # grpo.yaml's layout (Llama-3.1-8B, 16 samples of 1024 tokens per prompt): attention across the
    # 16 slots of one row would cost 1.6x the two forwards
    masked, cached = prefix_sharing_costs(4096, 1, 512, 16, 1024, 16)
    assert masked > 1.5 * cached
    assert prefix_sharing_costs(0, 1, 512, 16, 1024, 16) == (0, 0)  # unknown size: the one forward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_costly_mask_takes_the_cached_path_unless_the_layers_are_checkpointed(monkeypatch, checkpointing):
    from rlhf_trainer import forward, models

    taken = []
    monkeypatch.setattr(forward, "shared_mask_honoured", lambda model: True)
    monkeypatch.setattr(forward, "masked_shared_logprobs", lambda *a, **k: taken.append("masked") or (None, None))
    monkeypatch.setattr(forward, "cached_shared_logprobs", lambda *a, **k: taken.append("cached") or (None, None))
    model = models.load_policy("tiny://llama", seed=0).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    U, P, K, R = 1, 2, 8, 16  # many long responses per short prompt: the mask's pairs outweigh the tokens
    masked, cached = forward.prefix_sharing_costs(model.config.hidden_size, U, P, U * K, R, K)
    assert masked > 1.1 * cached
    forward.shared_prompt_logprobs(model, torch.ones(U, P, dtype=torch.long), torch.ones(U, P, dtype=torch.long),
                                   torch.ones(U * K, R, dtype=torch.long), torch.ones(U * K, R, dtype=torch.long),
                                   torch.zeros(U * K, dtype=torch.long))
    assert taken == ["masked" if checkpointing else "cached"]
    with torch.no_grad():  # no gradient, nothing checkpointed: the cache is there
        forward.shared_prompt_logprobs(model, torch.ones(U, P, dtype=torch.long), torch.ones(U, P, dtype=torch.long),
                                       torch.ones(U * K, R, dtype=torch.long), torch.ones(U * K, R, dtype=torch.long),
                                       torch.zeros(U * K, dtype=torch.long))
    assert taken[-1] == "cached"
    # Sharded by ZeRO-3 (parameters with a ds_id): the one forward, whatever the cost, on every rank alike
    next(model.parameters()).ds_id = 0
    forward.shared_prompt_logprobs(model, torch.ones(U, P, dtype=torch.long), torch.ones(U, P, dtype=torch.long),
                                   torch.ones(U * K, R, dtype=torch.long), torch.ones(U * K, R, dtype=torch.long),
                                   torch.zeros(U * K, dtype=torch.long))
    assert taken[-1] == "masked"


def test_the_mask_check_runs_at_the_first_prefix_shared_call_even_when_the_rows_fall_back(monkeypatch):
    # Its forwards must run on every ZeRO-3 rank at the same call: a rank whose rows take the plain path
    # (a row without a prompt token) runs them too.
    from rlhf_trainer import forward, models

    checked = []
    monkeypatch.setattr(forward, "shared_mask_honoured", lambda model: checked.append(model) or True)
    model = models.load_policy("tiny://llama", seed=0)
    ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # row 0: no prompt token before its response
    plain = forward.rollout_logprobs(model, ids, mask, response_length=2, prefix_sharing=True)[0]
    assert checked == [model]
    torch.testing.assert_close(plain, token_logprobs(model, ids, mask, response_length=2)[0])
    forward.rollout_logprobs(model, ids, mask, response_length=2)
    assert len(checked) == 1  # not without prefix sharing
