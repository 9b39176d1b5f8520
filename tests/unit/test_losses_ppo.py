"""PPO losses, KL estimators/controllers, per-token rewards and GAE against naive references."""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_trainer.losses import gae, kl, ppo, utils


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.float64)


# ---- utils ---------------------------------------------------------------------------------------


def test_masked_mean_var_whiten_match_the_selected_entries():
    x = rand(3, 6)
    picked = x[MASK.bool()]
    assert utils.masked_mean(x, MASK).item() == pytest.approx(picked.mean().item())
    mean, var = utils.global_masked_moments(x, MASK)
    assert (mean.item(), var.item()) == pytest.approx((picked.mean().item(), picked.var().item()))
    assert utils.global_mean(x) == pytest.approx(x.mean().item())
    assert utils.masked_mean(x, MASK, dim=1).tolist() == pytest.approx(
        [x[i][MASK[i].bool()].mean().item() for i in range(3)])
    white = utils.masked_whiten(x, MASK)
    assert white[MASK.bool()].mean().item() == pytest.approx(0.0, abs=1e-9)
    assert white[MASK.bool()].var().item() == pytest.approx(1.0, rel=1e-6)
    assert white[~MASK.bool()].abs().sum().item() == 0.0
    assert utils.masked_mean(x, torch.zeros_like(MASK)).item() == 0.0  # not NaN


def test_logprobs_and_entropy_match_the_definitions():
    logits = rand(2, 3, 5)
    labels = torch.tensor([[0, 4, 2], [1, 1, 3]])
    probs = torch.softmax(logits, -1)
    for b in range(2):
        for t in range(3):
            p = probs[b, t]
            assert utils.logprobs_from_logits(logits, labels)[b, t].item() == pytest.approx(
                math.log(p[labels[b, t]].item()), rel=1e-6)
            assert utils.entropy_from_logits(logits)[b, t].item() == pytest.approx(
                -sum(q * math.log(q) for q in p.tolist()), rel=1e-6)


def test_last_token_index_with_left_and_right_padding():
    assert utils.last_token_index(MASK).tolist() == [3, 5, 4]


# ---- KL --------------------------------------------------------------------------------------------


def test_k1_and_k3_elementwise():
    logp, ref = rand(4, 5, seed=1), rand(4, 5, seed=2)
    for a, b, k1, k3 in zip(logp.flatten().tolist(), ref.flatten().tolist(),
                            kl.kl_k1(logp, ref).flatten().tolist(), kl.kl_k3(logp, ref).flatten().tolist(),
                            strict=True):
        r = math.exp(b - a)
        assert k1 == pytest.approx(a - b)
        assert k3 == pytest.approx(r - 1 - math.log(r))
        assert k3 >= 0


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[samples], q.log()[samples]
    assert kl.kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl.kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)
    with pytest.raises(ValueError, match="k2"):
        kl.kl_estimate(logp, logq, "k2")


def test_adaptive_controller_follows_ziegler_update():
    ctl = kl.build_kl_controller(0.2, kl_target=6.0, kl_horizon=10000)
    assert isinstance(ctl, kl.AdaptiveKLController)
    ctl.update(current_kl=9.0, n_steps=256)  # error 0.5, clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(current_kl=5.7, n_steps=100)  # error -0.05, inside the clip
    assert ctl.value == pytest.approx(before * (1 - 0.05 * 100 / 10000))
    restored = kl.build_kl_controller(0.2, kl_target=6.0, kl_horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_an_edited_kl_coef_wins_over_the_saved_coefficient():
    ctl = kl.build_kl_controller(0.2, kl_target=6.0, kl_horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)
    kept = kl.build_kl_controller(0.2, kl_target=6.0, kl_horizon=10000)
    kept.load_state_dict(ctl.state_dict())
    assert kept.value == ctl.value != 0.2  # same klCoef: the adapted coefficient carries over
    edited = kl.build_kl_controller(0.1, kl_target=6.0, kl_horizon=10000)
    edited.load_state_dict(ctl.state_dict())
    assert edited.value == 0.1  # klCoef edited since the save: the edit applies
    old_format = kl.build_kl_controller(0.1, kl_target=6.0, kl_horizon=10000)
    old_format.load_state_dict({"value": 0.3})  # a checkpoint from before: taken as saved
    assert old_format.value == 0.3


def test_fixed_controller_never_moves():
    ctl = kl.build_kl_controller(0.05, kl_target=0.0, kl_horizon=10)
    ctl.update(100.0, 1000)
    assert type(ctl) is kl.FixedKLController and ctl.value == 0.05


# ---- PPO losses ------------------------------------------------------------------------------------


def naive_policy_loss(logp, old, adv, mask, eps, dual, num_tokens):
    total, clipped = 0.0, 0
    for a, o, A, m in zip(logp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist(),
                          mask.flatten().tolist(), strict=True):
        if not m:
            continue
        ratio = math.exp(a - o)
        loss = max(-A * ratio, -A * min(max(ratio, 1 - eps), 1 + eps))
        if dual and A < 0:
            loss = min(loss, -dual * A)
        total += loss
        clipped += abs(ratio - 1) > eps
    return total / num_tokens, clipped / mask.sum().item()


@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_policy_loss_matches_the_elementwise_formula(dual_clip):
    logp, old = rand(3, 6, seed=3), rand(3, 6, seed=4)  # large ratios: both clips engage
    adv = rand(3, 6, seed=5)
    loss, frac = ppo.policy_loss(logp, old, adv, MASK, clip_range=0.2, dual_clip=dual_clip, num_tokens=40)
    want_loss, want_frac = naive_policy_loss(logp, old, adv, MASK, 0.2, dual_clip, 40)
    assert loss.item() == pytest.approx(want_loss)
    assert frac.item() == pytest.approx(want_frac)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(10.0), dtype=torch.float64)  # ratio 10
    adv = torch.full((1, 1), -2.0, dtype=torch.float64)
    mask = torch.ones(1, 1)
    plain, _ = ppo.policy_loss(logp, old, adv, mask, clip_range=0.2)
    dual, _ = ppo.policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=3.0)
    assert plain.item() == pytest.approx(20.0)  # -A * ratio
    assert dual.item() == pytest.approx(6.0)  # -c * A
    with pytest.raises(ValueError, match="dual_clip"):
        ppo.policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=0.5)


def test_policy_gradient_is_zero_outside_the_clip_in_the_clipped_direction():
    logp = torch.tensor([[math.log(1.5)]], dtype=torch.float64, requires_grad=True)
    loss, frac = ppo.policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64),
                                 torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1), clip_range=0.2)
    loss.backward()
    assert logp.grad.item() == 0.0 and frac.item() == 1.0


def test_split_micro_batches_sum_to_the_full_batch_loss():
    logp, old, adv = rand(3, 6, seed=6), rand(3, 6, seed=7), rand(3, 6, seed=8)
    n = MASK.sum()
    full, _ = ppo.policy_loss(logp, old, adv, MASK, clip_range=0.2, num_tokens=n)
    parts = sum(ppo.policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], MASK[i:i + 1],
                                clip_range=0.2, num_tokens=n)[0] for i in range(3))
    assert parts.item() == pytest.approx(full.item())


@pytest.mark.parametrize("clip", [0.0, 0.2])
def test_value_loss_matches_the_elementwise_formula(clip):
    values, old, returns = rand(3, 6, seed=9), rand(3, 6, seed=10), rand(3, 6, seed=11)
    total = 0.0
    for v, o, r, m in zip(values.flatten().tolist(), old.flatten().tolist(), returns.flatten().tolist(),
                          MASK.flatten().tolist(), strict=True):
        if m:
            err = (v - r) ** 2
            if clip:
                err = max(err, (o + min(max(v - o, -clip), clip) - r) ** 2)
            total += 0.5 * err
    got = ppo.value_loss(values, old, returns, MASK, clip_range=clip, num_tokens=7)
    assert got.item() == pytest.approx(total / 7)


# ---- rewards and GAE --------------------------------------------------------------------------------


def test_score_lands_on_the_last_real_token_with_left_and_right_padding():
    logp, ref = rand(3, 6, seed=12), rand(3, 6, seed=13)
    k = kl.kl_estimate(logp, ref, "k1") * MASK
    scores = torch.tensor([1.0, 20.0, -3.0], dtype=torch.float64)
    rewards = gae.token_rewards(k, scores, MASK, kl_coef=0.1, reward_clip=10.0)
    expected = -0.1 * (logp - ref) * MASK
    expected[0, 3] += 1.0
    expected[1, 5] += 10.0  # clipped
    expected[2, 4] += -3.0  # left padding in front, right padding after
    assert torch.allclose(rewards, expected)
    assert rewards[MASK == 0].abs().sum().item() == 0.0


def test_truncated_responses_pay_the_penalty_not_a_forced_eos():
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)  # row 0 ended (EOS at 1)
    scores = torch.tensor([1.0, 1.0], dtype=torch.float64)
    ended = torch.tensor([True, False])
    rewards = gae.token_rewards(zeros, scores, mask, kl_coef=0.1, ended=ended, truncation_penalty=0.5)
    assert rewards.tolist() == [[0, 1.0, 0], [0, 0, 0.5]]  # no token was appended to row 1
    default = gae.token_rewards(zeros, scores, mask, kl_coef=0.1, ended=ended)
    assert default[1, 2].item() == 1.0 - gae.TRUNCATION_PENALTY
    off = gae.token_rewards(zeros, scores, mask, kl_coef=0.1, ended=ended, truncation_penalty=0.0)
    assert off[1, 2].item() == 1.0  # a complete answer at max_new_tokens keeps its score


def test_entropy_bonus_matches_a_hand_calculation():
    """Two tokens of one row, vocabulary 2: uniform logits (H = ln 2) and certain logits (H ~ 0)."""
    logits = torch.tensor([[[0.0, 0.0], [50.0, 0.0], [3.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # the third token is padding
    term, entropy = ppo.entropy_bonus(logits, mask, coef=0.1, num_tokens=4.0)
    h_certain = math.log1p(math.exp(-50.0)) + 50.0 * math.exp(-50.0) / (1 + math.exp(-50.0))
    assert entropy.item() == pytest.approx((math.log(2) + h_certain) / 2)
    assert term.item() == pytest.approx(-0.1 * (math.log(2) + h_certain) / 4.0)  # the global normaliser
    term.backward()
    # d(-c H)/dz at uniform logits is 0 (a maximum); the padded token gets no gradient.
    assert logits.grad[0, 0].abs().max().item() == pytest.approx(0.0, abs=1e-12)
    assert logits.grad[0, 2].abs().max().item() == 0.0
    off, entropy_off = ppo.entropy_bonus(logits, mask, coef=0.0)
    assert off.item() == 0.0 and not off.requires_grad and entropy_off.item() == pytest.approx(entropy.item())


def test_entropy_bonus_raises_entropy_when_descended():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], requires_grad=True)
    mask = torch.ones(1, 1)
    term, before = ppo.entropy_bonus(logits, mask, coef=1.0)
    term.backward()
    with torch.no_grad():
        _, after = ppo.entropy_bonus(logits - 0.1 * logits.grad, mask, coef=1.0)
    assert after.item() > before.item()


def test_the_default_truncation_penalty_is_the_hyperparameter_default():
    from rlhf_contract.config import Hyperparameters

    assert Hyperparameters().truncation_penalty == gae.TRUNCATION_PENALTY


def naive_gae(rewards, values, gamma, lam):
    """One unpadded sequence, straight from the definition A_t = sum_l (gamma lam)^l delta_{t+l}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_the_definition_per_sequence(gamma, lam):
    rewards, values = rand(3, 6, seed=16), rand(3, 6, seed=17)
    adv, ret = gae.gae_advantages(rewards, values, MASK, gamma=gamma, lam=lam)
    for b in range(3):
        keep = MASK[b].bool()
        want_adv, want_ret = naive_gae(rewards[b][keep].tolist(), values[b][keep].tolist(), gamma, lam)
        assert adv[b][keep].tolist() == pytest.approx(want_adv)
        assert ret[b][keep].tolist() == pytest.approx(want_ret)
        assert adv[b][~keep].abs().sum().item() == 0.0


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    r = torch.tensor([[0.1, -0.2, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.4, 0.3]], dtype=torch.float64)
    adv, ret = gae.gae_advantages(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert ret.tolist()[0] == pytest.approx([0.9, 0.8, 1.0])  # reward-to-go
    assert adv.tolist()[0] == pytest.approx([0.4, 0.4, 0.7])


# ---- experience ---------------------------------------------------------------------------------------


def test_experience_splits_rows_and_counts_response_tokens():
    from rlhf_trainer.experience import Experience

    rows, prompt, response = 5, 3, 4
    action_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    exp = Experience(
        sequences=torch.arange(rows * 7).view(rows, 7), attention_mask=torch.ones(rows, 7, dtype=torch.long),
        position_ids=torch.arange(7).expand(rows, 7), action_mask=action_mask,
        old_logprobs=rand(rows, response), ref_logprobs=rand(rows, response, seed=1),
        scores=torch.arange(rows, dtype=torch.float), truncated=torch.tensor([False, True, False, False, True]),
        values=rand(rows, response, seed=2), info={"reward_mean": 0.5},
    )
    assert exp.prompt_length == prompt and exp.num_tokens == 14
    parts = exp.split(2)
    assert [p.sequences.shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p.values for p in parts]), exp.values)
    assert parts[2].scores.tolist() == [4.0] and parts[2].returns is None
    assert sum(p.num_tokens for p in parts) == exp.num_tokens
    assert exp.to("cpu").info == {"reward_mean": 0.5}
