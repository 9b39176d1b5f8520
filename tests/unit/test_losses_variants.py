"""Loss variants against the reference implementations' formulas and hand calculations:
GRPO loss aggregations (TRL's grpo / dr_grpo / dapo), clip-higher, REINFORCE++ returns, SimPO, ORPO, CPO."""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_trainer.losses import aggregation, dpo, orpo, ppo, reinforce, simpo


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.float64)
MAX_LEN = 6


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


# ---- aggregation -------------------------------------------------------------------------------------


def trl_loss(per_token, mask, loss_type):
    """TRL GRPOTrainer._compute_loss on one process, one micro-batch (B rows)."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * MAX_LEN)
    return (per_token * mask).sum() / mask.sum()  # dapo: num_items_in_batch / num_processes


@pytest.mark.parametrize("loss_type", aggregation.LOSS_AGGREGATIONS)
def test_token_weights_reproduce_trls_loss_types(loss_type):
    per_token = rand(3, 6)
    weights = aggregation.token_weights(MASK, loss_type, num_tokens=MASK.sum(), num_sequences=3, max_length=MAX_LEN)
    assert (per_token * weights).sum().item() == pytest.approx(trl_loss(per_token, MASK, loss_type).item())
    assert weights[MASK == 0].abs().sum().item() == 0.0


def test_grpo_aggregation_by_hand():
    # Rows of 4, 6 and 3 tokens, every token loss 1 except row 1's (2): grpo = mean(1, 2, 1) = 4/3;
    # dr_grpo = (4 + 12 + 3) / (3 * 6) = 19/18; dapo = 19 / 13.
    per_token = torch.ones(3, 6, dtype=torch.float64)
    per_token[1] = 2.0
    got = {t: (per_token * aggregation.token_weights(MASK, t, num_tokens=13, num_sequences=3, max_length=6)).sum()
           for t in aggregation.LOSS_AGGREGATIONS}
    assert got["grpo"].item() == pytest.approx(4 / 3)
    assert got["dr_grpo"].item() == pytest.approx(19 / 18)
    assert got["dapo"].item() == pytest.approx(19 / 13)


@pytest.mark.parametrize("loss_type", aggregation.LOSS_AGGREGATIONS)
def test_micro_batches_add_up_to_the_batch_loss(loss_type):
    logp, old, adv = rand(3, 6, seed=1), rand(3, 6, seed=2), rand(3, 6, seed=3)
    kwargs = {"num_tokens": MASK.sum(), "num_sequences": 3, "max_length": MAX_LEN}
    full, _ = ppo.policy_loss(logp, old, adv, MASK, clip_range=0.2,
                              weights=aggregation.token_weights(MASK, loss_type, **kwargs))
    parts = sum(ppo.policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], MASK[i:i + 1], clip_range=0.2,
                                weights=aggregation.token_weights(MASK[i:i + 1], loss_type, **kwargs))[0]
                for i in range(3))
    assert parts.item() == pytest.approx(full.item())


def test_unknown_aggregation_names_the_choices():
    with pytest.raises(ValueError, match="grpo | dr_grpo | dapo"):
        aggregation.token_weights(MASK, "bnpo", num_tokens=1, num_sequences=1, max_length=1)


# ---- clip-higher ------------------------------------------------------------------------------------


def naive_policy_loss(logp, old, adv, mask, low, high, num_tokens):
    total, clipped = 0.0, 0
    for a, o, A, m in zip(logp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist(),
                          mask.flatten().tolist(), strict=True):
        if m:
            ratio = math.exp(a - o)
            total += max(-A * ratio, -A * min(max(ratio, 1 - low), 1 + high))
            clipped += ratio < 1 - low or ratio > 1 + high
    return total / num_tokens, clipped / mask.sum().item()


def test_clip_higher_matches_the_elementwise_formula():
    logp, old, adv = rand(3, 6, seed=4) * 0.3, rand(3, 6, seed=5) * 0.3, rand(3, 6, seed=6)
    loss, frac = ppo.policy_loss(logp, old, adv, MASK, clip_range=0.2, clip_range_high=0.28, num_tokens=13)
    want_loss, want_frac = naive_policy_loss(logp, old, adv, MASK, 0.2, 0.28, 13)
    assert loss.item() == pytest.approx(want_loss)
    assert frac.item() == pytest.approx(want_frac)


def test_clip_higher_lets_a_positive_advantage_raise_the_ratio_further():
    # ratio 1.25, A = 1: symmetric 0.2 clips it (no gradient), eps_high 0.28 does not.
    logp = torch.tensor([[math.log(1.25)]], dtype=torch.float64, requires_grad=True)
    zero, one, mask = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1)
    sym, _ = ppo.policy_loss(logp, zero, one, mask, clip_range=0.2)
    assert sym.item() == pytest.approx(-1.2)
    sym.backward()
    assert logp.grad.item() == 0.0
    logp.grad = None
    high, frac = ppo.policy_loss(logp, zero, one, mask, clip_range=0.2, clip_range_high=0.28)
    high.backward()
    assert high.item() == pytest.approx(-1.25) and frac.item() == 0.0
    assert logp.grad.item() == pytest.approx(-1.25)  # d(-ratio)/dlogp
    # The low side is unchanged: ratio 0.75 with A = -1 stays clipped at 0.8.
    low, _ = ppo.policy_loss(torch.full((1, 1), math.log(0.75), dtype=torch.float64), zero, -one, mask,
                             clip_range=0.2, clip_range_high=0.28)
    assert low.item() == pytest.approx(0.8)


# ---- REINFORCE++ ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_follow_the_definition(gamma):
    rewards = rand(3, 6, seed=7)
    got = reinforce.discounted_returns(rewards, MASK, gamma=gamma)
    for b in range(3):
        keep = MASK[b].bool()
        r = rewards[b][keep].tolist()
        want = [sum(gamma ** (s - t) * r[s] for s in range(t, len(r))) for t in range(len(r))]
        assert got[b][keep].tolist() == pytest.approx(want)
        assert got[b][~keep].abs().sum().item() == 0.0


def test_reinforce_pp_advantages_whiten_the_returns_over_the_batch():
    # Score 1 on the last token of row 0, -1 on row 2's, no KL: returns are 1 (4 tokens), 0 (6), -1 (3).
    rewards = torch.zeros(3, 6, dtype=torch.float64)
    rewards[0, 3], rewards[2, 4] = 1.0, -1.0
    adv, ret = reinforce.reinforce_pp_advantages(rewards, MASK, gamma=1.0)
    assert ret[0, :4].tolist() == [1.0] * 4 and ret[2, 2:5].tolist() == [-1.0] * 3
    values = [1.0] * 4 + [0.0] * 6 + [-1.0] * 3
    mean = sum(values) / 13
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 12)
    assert adv[0, 0].item() == pytest.approx((1 - mean) / std, rel=1e-6)
    assert adv[1, 0].item() == pytest.approx((0 - mean) / std, rel=1e-6)
    assert adv[MASK.bool()].mean().item() == pytest.approx(0.0, abs=1e-12)


# ---- SimPO and ORPO ---------------------------------------------------------------------------------


CHOSEN = torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64)  # average log-probs
REJECTED = torch.tensor([-1.5, -0.8, -2.5], dtype=torch.float64)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_matches_eq_6(smoothing):
    beta, gamma = 2.0, 0.5
    out = simpo.simpo_loss(CHOSEN, REJECTED, beta=beta, gamma=gamma, label_smoothing=smoothing)
    want = []
    for c, r in zip(CHOSEN.tolist(), REJECTED.tolist(), strict=True):
        z = beta * c - beta * r - gamma
        want.append(-(1 - smoothing) * logsigmoid(z) - smoothing * logsigmoid(-z))
    assert out.loss.item() == pytest.approx(sum(want) / 3)
    assert out.chosen_rewards.tolist() == pytest.approx([-1.0, -2.0, -4.0])
    assert out.accuracy.item() == pytest.approx(2 / 3)


def test_simpo_and_orpo_average_their_log_probs():
    assert "simpo" in dpo.TOKEN_AVERAGED and "orpo" in dpo.TOKEN_AVERAGED


def test_orpo_odds_ratio_matches_trls_formula():
    beta = 0.1
    out = orpo.odds_ratio_loss(CHOSEN, REJECTED, beta=beta)
    want = []
    for c, r in zip(CHOSEN.tolist(), REJECTED.tolist(), strict=True):
        # TRL ORPOTrainer.odds_ratio_loss: log_odds = (c - r) - (log1p(-exp(c)) - log1p(-exp(r)))
        log_odds = (c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r)))
        want.append(-beta * logsigmoid(log_odds))
    assert out.loss.item() == pytest.approx(sum(want) / 3)
    # By hand, pair 0: P_w = e^-0.5 = 0.6065, P_l = e^-1.5 = 0.2231; odds 1.5415 and 0.2872;
    # log ratio 1.6803; -0.1 * log sigmoid(1.6803) = 0.1 * log(1 + e^-1.6803) = 0.017086.
    assert want[0] == pytest.approx(0.017086, abs=1e-6)


def test_cpo_is_trls_sigmoid_loss_on_summed_log_probs_plus_weighted_nll():
    from types import SimpleNamespace

    from rlhf_trainer.algorithms.dpo import DPO, chosen_nll_weight

    assert "cpo" not in dpo.TOKEN_AVERAGED  # CPO's log pi(y|x) is the sum over the response (eq. 3)
    hp = SimpleNamespace(beta=0.2, label_smoothing=0.1, cpo_alpha=0.5)
    out = DPO.preference_loss(SimpleNamespace(hp=hp, kind="cpo"), CHOSEN, REJECTED, None)
    want = []
    for c, r in zip(CHOSEN.tolist(), REJECTED.tolist(), strict=True):
        # TRL CPOTrainer.cpo_loss, loss_type sigmoid: -logsigmoid(beta d) (1 - e) - logsigmoid(-beta d) e
        d = c - r
        want.append(-logsigmoid(0.2 * d) * 0.9 - logsigmoid(-0.2 * d) * 0.1)
    assert out.loss.item() == pytest.approx(sum(want) / 3)
    assert out.chosen_rewards.tolist() == pytest.approx((0.2 * CHOSEN).tolist())
    assert chosen_nll_weight("cpo", hp) == 0.5 and chosen_nll_weight("orpo", hp) == 1.0
    assert chosen_nll_weight("simpo", hp) == 0.0 and chosen_nll_weight("sigmoid", hp) == 0.0


def test_orpo_log_odds_stay_finite_at_probability_one():
    assert torch.isfinite(orpo.log_odds(torch.tensor([0.0, -1e-9]))).all()


# ---- PPO-ptx ----------------------------------------------------------------------------------------


def test_ptx_loss_is_gamma_times_the_mean_next_token_nll_by_hand():
    from rlhf_trainer.losses import ptx

    ids = torch.tensor([[0, 1, 2], [2, 1, 0]])
    attention = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1: one padding token
    labels = ptx.lm_labels(ids, attention)
    assert labels.tolist() == [[0, 1, 2], [2, 1, -100]]
    # Uniform logits over 4 tokens except row 0 predicting token 1 with logits (0, log 3, 0, 0):
    # p = 3/6. Learned positions: row 0 -> tokens 1, 2; row 1 -> token 1. NLL = log 2 + 2 log 4.
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = math.log(3.0)
    want = 0.5 * (math.log(2.0) + 2 * math.log(4.0)) / 3
    assert ptx.ptx_loss(logits, labels, coef=0.5).item() == pytest.approx(want)
    assert ptx.ptx_loss(logits, labels, coef=0.5, num_tokens=6).item() == pytest.approx(want / 2)
