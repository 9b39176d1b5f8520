"""GRPO/RLOO advantages and loss, DPO variants, Bradley-Terry, SFT masking and packing."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from rlhf_trainer.losses import dpo, grpo, rm, sft


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


# ---- GRPO / RLOO --------------------------------------------------------------------------------


def test_grpo_advantages_normalise_within_each_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 3.0, 1.0, 2.0, 0.0])
    got = grpo.group_advantages(scores, 4).tolist()
    for g in range(3):
        group = scores[4 * g:4 * g + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        assert got[4 * g:4 * g + 4] == pytest.approx([(s - mean) / (std + 1e-4) for s in group], abs=1e-6)
    assert got[4:8] == [0.0] * 4  # equal scores: no signal, no NaN


def test_grpo_advantages_without_std_scaling_only_centre():
    scores = torch.tensor([1.0, 3.0, 0.0, 2.0])
    assert grpo.group_advantages(scores, 2, scale_by_std=False).tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_rloo_baseline_leaves_one_out():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    got = grpo.rloo_advantages(scores, 3).tolist()
    want = []
    for g in range(2):
        group = scores[3 * g:3 * g + 3].tolist()
        want += [s - (sum(group) - s) / 2 for s in group]
    assert got == pytest.approx(want)
    # RLOO advantages equal G/(G-1) times the group-centred scores
    assert got == pytest.approx((1.5 * grpo.group_advantages(scores, 3, scale_by_std=False)).tolist())


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=">= 2"):
        grpo.rloo_advantages(torch.zeros(4), 1)


def test_k3_kl_loss_sums_k3_over_the_mask_per_global_token():
    logp, ref = rand(4, 5, seed=1) * 0.1, rand(4, 5, seed=3) * 0.1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    total = 0.0
    for a, b, m in zip(logp.flatten().tolist(), ref.flatten().tolist(), mask.flatten().tolist(), strict=True):
        r = math.exp(b - a)
        total += m * (r - 1 - math.log(r))
    assert grpo.k3_kl_loss(logp, ref, mask, num_tokens=20).item() == pytest.approx(total / 20)
    assert grpo.k3_kl_loss(logp, ref, mask).item() == pytest.approx(total / 11)
    assert grpo.k3_kl_loss(ref, ref, mask).item() == 0.0


# ---- DPO --------------------------------------------------------------------------------------------


PC, PR, RC, RR = (torch.tensor(v, dtype=torch.float64) for v in
                  ([-5.0, -7.0, -3.0], [-6.0, -6.5, -9.0], [-5.5, -7.0, -4.0], [-5.5, -7.0, -8.0]))


def margins():
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC.tolist(), PR.tolist(), RC.tolist(), RR.tolist(),
                                                            strict=True)]


@pytest.mark.parametrize(("loss_type", "smoothing", "formula"), [
    ("sigmoid", 0.0, lambda h, b: -logsigmoid(b * h)),
    ("sigmoid", 0.2, lambda h, b: -0.8 * logsigmoid(b * h) - 0.2 * logsigmoid(-b * h)),
    ("ipo", 0.0, lambda h, b: (h - 1 / (2 * b)) ** 2),
    ("hinge", 0.0, lambda h, b: max(0.0, 1 - b * h)),
])
def test_dpo_losses_match_the_papers(loss_type, smoothing, formula):
    beta = 0.5
    out = dpo.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    assert out.loss.item() == pytest.approx(statistics.mean(formula(h, beta) for h in margins()))


def test_dpo_rewards_and_accuracy():
    loss, chosen, rejected, accuracy = dpo.dpo_loss(PC, PR, RC, RR)  # beta 0.1 default
    assert chosen.tolist() == pytest.approx([0.05, 0.0, 0.1])
    assert rejected.tolist() == pytest.approx([-0.05, 0.05, -0.1])
    assert accuracy.item() == pytest.approx(2 / 3)
    assert not chosen.requires_grad


def test_dpo_sigmoid_gradient_raises_the_chosen_log_prob():
    pc = PC.clone().requires_grad_(True)
    dpo.dpo_loss(pc, PR, RC, RR).loss.backward()
    assert (pc.grad < 0).all()  # descending the loss increases log pi(chosen)


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError, match="kto"):
        dpo.dpo_loss(PC, PR, RC, RR, loss_type="kto")


def test_sequence_logprobs_sum_or_average_over_the_mask():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert dpo.sequence_logprobs(logp, mask).tolist() == [-5.0, -4.0]
    assert dpo.sequence_logprobs(logp, mask, average=True).tolist() == [-2.5, -4.0]


def test_ipo_uses_token_averaged_log_probs_so_unequal_lengths_share_the_target():
    # Pair: chosen 2 response tokens, rejected 4 (rows start with 1 prompt token; mask (R, T)).
    loss_mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    policy = torch.full((2, 4), -1.0, dtype=torch.float64)  # log-probs of tokens 1..4
    reference = torch.full((2, 4), -1.5, dtype=torch.float64)
    ipo = [dpo.preference_logprobs(x, loss_mask, "ipo") for x in (policy, reference)]
    assert ipo[0].tolist() == [-1.0, -1.0] and ipo[1].tolist() == [-1.5, -1.5]
    # Averages: h = (-1 - -1) - (-1.5 - -1.5) = 0, IPO loss (0 - 1/(2*0.5))^2 = 1.
    out = dpo.dpo_loss(ipo[0][:1], ipo[0][1:], ipo[1][:1], ipo[1][1:], beta=0.5, loss_type="ipo")
    assert out.loss.item() == pytest.approx(1.0)
    # Sums (what the loop fed before): h = (-2 - -4) - (-3 - -6) = -1, loss (-1 - 1)^2 = 4.
    summed = [dpo.preference_logprobs(x, loss_mask, "sigmoid") for x in (policy, reference)]
    assert summed[0].tolist() == [-2.0, -4.0]
    out = dpo.dpo_loss(summed[0][:1], summed[0][1:], summed[1][:1], summed[1][1:], beta=0.5, loss_type="ipo")
    assert out.loss.item() == pytest.approx(4.0)


# ---- reward model -------------------------------------------------------------------------------------


def test_bradley_terry_with_margin():
    chosen = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    loss = rm.bradley_terry_loss(chosen, rejected, margin=0.5)
    want = statistics.mean(-logsigmoid(c - r - 0.5) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True))
    assert loss.item() == pytest.approx(want)
    assert rm.preference_accuracy(chosen, rejected).item() == pytest.approx(1 / 3)
    no_margin = rm.bradley_terry_loss(chosen, rejected)
    assert no_margin.item() < loss.item()


# ---- SFT -----------------------------------------------------------------------------------------------


def test_sft_loss_ignores_prompt_tokens_and_shifts():
    logits = rand(2, 4, 7, seed=4)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 2, 4, -100]])
    logp = torch.log_softmax(logits, -1)
    # positions t predict labels[t+1]: (0,1)->5, (0,2)->6, (1,0)->2, (1,1)->4
    want = -(logp[0, 1, 5] + logp[0, 2, 6] + logp[1, 0, 2] + logp[1, 1, 4]).item()
    assert sft.count_loss_tokens(labels).item() == 4
    assert sft.sft_loss(logits, labels).item() == pytest.approx(want / 4)
    assert sft.sft_loss(logits, labels, num_tokens=8).item() == pytest.approx(want / 8)


def test_packing_restarts_positions_and_masks_boundaries():
    examples = [([1, 10, 11], [-100, 10, 11]), ([1, 20], [-100, 20]), ([1, 30, 31, 32], [-100, -100, 31, 32]),
                ([1, 40, 41, 42, 43, 44, 45], [-100, 40, 41, 42, 43, 44, 45])]
    packed = sft.pack_sequences(examples, max_length=6, pad_token_id=0)
    assert packed["input_ids"].tolist() == [[1, 10, 11, 1, 20, 0], [1, 30, 31, 32, 0, 0], [1, 40, 41, 42, 43, 44]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert packed["labels"].tolist() == [[-100, 10, 11, -100, 20, -100], [-100, -100, 31, 32, -100, -100],
                                         [-100, 40, 41, 42, 43, 44]]
    # Every learned label in a packed row is one the unpacked example learns too.
    assert sft.count_loss_tokens(packed["labels"]).item() == 2 + 1 + 2 + 5


def test_packed_rows_give_the_same_logits_as_separate_rows():
    import transformers  # the test may; the losses package may not

    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    a, b = [1, 5, 6, 7], [1, 8, 9]
    batch = {"input_ids": torch.tensor([a, b + [0]]), "attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]])}
    labels = torch.tensor([[-100, 5, 6, 7], [-100, 8, 9, -100]])
    packed, packed_labels, position_ids = sft.pack_examples(batch, labels, max_length=8)
    assert packed_labels.tolist() == [[-100, 5, 6, 7, -100, 8, 9, -100]]
    assert set(packed) == {"input_ids"}  # no attention_mask on purpose
    with torch.no_grad():
        # no attention_mask and no cache: the model reads example boundaries from position_ids
        together = model(input_ids=packed["input_ids"], position_ids=position_ids, use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(together[:4], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[4:7], alone_b, atol=1e-5, rtol=1e-4)
