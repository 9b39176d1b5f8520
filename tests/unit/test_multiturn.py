"""Multi-turn rollouts (rlhf_trainer.multiturn, losses.turns, chat.Renderer.environment_ids) and SCoRe
(rlhf_trainer.self_correction): environment tokens are no actions (no loss, no KL, skipped by GAE),
per-turn rewards land on each turn's last token, the stage follows the step, the bonus is alpha (r2 - r1)."""

from __future__ import annotations

import types

import pytest
import torch
from rlhf_contract.config import Hyperparameters
from rlhf_trainer import models
from rlhf_trainer.chat import Renderer
from rlhf_trainer.losses import gae, turns
from rlhf_trainer.losses.grpo import group_advantages, k3_kl_loss
from rlhf_trainer.losses.ppo import policy_loss, value_loss
from rlhf_trainer.multiturn import FixedInstruction, conversation_before, rollout, turn_stats
from rlhf_trainer.self_correction import (
    STAGE_ONE,
    STAGE_TWO,
    correction_metrics,
    shaped_turn_rewards,
    stage_of,
    turn_kl_coefs,
    turn_plan,
)
from rlhf_trainer.tokenized import PromptRow

INSTRUCTION = Hyperparameters().turn_instruction
# Two rows, 10 columns: turn 0, environment tokens (-1), turn 1, padding (-1 at the end).
TURN_IDS = torch.tensor([[0, 0, -1, -1, -1, 1, 1, 1, -1, -1],
                         [0, 0, 0, -1, -1, 1, -1, -1, -1, -1]])
ACTIONS = (TURN_IDS >= 0).float()
ENVIRONMENT = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]).bool()
# A ChatML-like template in printable ASCII (the tiny vocabulary), ending each turn with EOS then "\n".
JINJA = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
         "{% if add_generation_prompt %}<assistant>{% endif %}")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- the rollout ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rollout():
    """Two turns of a tiny random Llama on two arithmetic prompts, raw template (a plain join)."""
    tokenizer = models.load_tokenizer("tiny://llama")
    renderer = Renderer(tokenizer, "raw")
    model = models.load_policy("tiny://llama", seed=0)
    rows = [PromptRow(ids=renderer.prompt_ids(p), truncated=False, prompt=p, answer=a, source=f"row {i}")
            for i, (p, a) in enumerate([("1+2=", "3"), ("2+2=", "4")])]
    hp = Hyperparameters(turns=2, max_new_tokens=3, temperature=1.0)
    torch.manual_seed(0)
    return renderer, rows, rollout(model, renderer, rows, hp, FixedInstruction(INSTRUCTION))


def test_a_rollout_is_prompt_then_policy_environment_policy_and_only_the_policy_tokens_are_actions(tiny_rollout):
    renderer, rows, roll = tiny_rollout
    tokenizer = renderer.tokenizer
    P = roll.sequences.shape[1] - roll.action_mask.shape[1]
    environment = renderer.environment_ids(rows[0].prompt, ["x"], INSTRUCTION, ended=True)
    for i, row in enumerate(rows):
        assert roll.sequences[i, :P][roll.attention_mask[i, :P].bool()].tolist() == row.ids
        ids, turn_ids = roll.sequences[i, P:], roll.turn_ids[i]
        first, second = ids[turn_ids == 0].tolist(), ids[turn_ids == 1].tolist()
        assert 1 <= len(first) <= 3 and 1 <= len(second) <= 3
        # Between the turns exactly the environment's tokens: "\n" + instruction + "\n" (raw), no action.
        between = ids[len(first):len(first) + len(environment)]
        assert tokenizer.decode(between.tolist()) == f"\n{INSTRUCTION}\n"
        assert roll.action_mask[i, len(first):len(first) + len(environment)].sum() == 0
        assert roll.action_mask[i].tolist() == (turn_ids >= 0).long().tolist()
        assert roll.turn_responses[i] == [tokenizer.decode(first, skip_special_tokens=True),
                                          tokenizer.decode(second, skip_special_tokens=True)]
        # The second turn answers the conversation so far; the first the prompt itself.
        assert roll.turn_prompts[i][0] == row.prompt
        assert roll.turn_prompts[i][1] == conversation_before(row.prompt, [roll.turn_responses[i][0], INSTRUCTION])
        assert roll.truncated[i] == roll.turn_truncated[i].any()


def test_one_turn_is_the_single_turn_generate(tiny_rollout):
    from rlhf_trainer.algorithms.common import generate

    renderer, rows, _ = tiny_rollout
    model = models.load_policy("tiny://llama", seed=0)
    hp = Hyperparameters(turns=1, max_new_tokens=3)
    torch.manual_seed(1)
    ours = rollout(model, renderer, rows, hp, FixedInstruction(INSTRUCTION))
    torch.manual_seed(1)
    theirs = generate(model, renderer.tokenizer, rows, hp, renderer.stop_ids)
    assert ours.turn_ids is None and torch.equal(ours.sequences, theirs.sequences)
    assert ours.responses == theirs.responses


def test_a_chat_template_closes_a_truncated_turn_and_opens_the_next_as_environment_tokens():
    tokenizer = models.load_tokenizer("tiny://llama")
    renderer = Renderer(tokenizer, JINJA)
    eos = tokenizer.eos_token
    ended = renderer.environment_ids("1+2=", ["3"], "Check.", ended=True)
    truncated = renderer.environment_ids("1+2=", ["3"], "Check.", ended=False)
    # The sampled stop token (EOS) is the policy's; what the template writes after it is the environment's.
    assert tokenizer.decode(ended) == "\n<user>Check." + eos + "\n<assistant>"
    # A turn cut at maxNewTokens is closed by the environment (its EOS is no action).
    assert tokenizer.decode(truncated) == eos + "\n<user>Check." + eos + "\n<assistant>"
    # The same text the template renders for the whole conversation.
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                                           {"role": "user", "content": "Check."}], add_generation_prompt=True,
                                          tokenize=False)
    assert whole.endswith(tokenizer.decode(truncated))


# ---- no loss, no KL on environment tokens -----------------------------------------------------------


def test_environment_tokens_get_no_policy_gradient_no_kl_gradient_and_no_value_loss():
    logprobs = rand(2, 10, seed=1).requires_grad_()
    ref, advantages = rand(2, 10, seed=2), rand(2, 10, seed=3)  # nonzero everywhere, also off the actions
    loss, _ = policy_loss(logprobs, logprobs.detach() - 0.1, advantages, ACTIONS, clip_range=0.2)
    coefs = turns.turn_coefficients((0.3, 0.05), TURN_IDS)
    loss = loss + k3_kl_loss(logprobs, ref, ACTIONS, weights=ACTIONS / ACTIONS.sum() * coefs)
    loss.backward()
    assert logprobs.grad[ENVIRONMENT].abs().sum() == 0
    assert logprobs.grad[ACTIONS.bool()].abs().min() > 0
    values = rand(2, 10, seed=4).requires_grad_()
    value_loss(values, values.detach(), rand(2, 10, seed=5), ACTIONS, clip_range=0.2).backward()
    assert values.grad[ENVIRONMENT].abs().sum() == 0


def test_ppo_token_rewards_carry_no_kl_on_environment_tokens_and_each_turn_reward_on_its_last_token():
    kl = rand(2, 10, seed=6)  # nonzero on environment tokens too: they must not count
    rewards = turns.turn_token_rewards(kl, torch.tensor([[0.1, 1.0], [1.0, 0.0]]), TURN_IDS,
                                       kl_coefs=turns.turn_coefficients((0.5, 0.1), TURN_IDS))
    assert rewards[ENVIRONMENT].abs().sum() == 0
    want = -turns.turn_coefficients((0.5, 0.1), TURN_IDS) * kl * ACTIONS
    want[0, 1] += 0.1  # turn 0 of row 0 ends at column 1, turn 1 at column 7
    want[0, 7] += 1.0
    want[1, 2] += 1.0
    want[1, 5] += 0.0
    assert torch.allclose(rewards, want)
    assert turns.turn_ends(TURN_IDS, 2).tolist() == [[1, 7], [2, 5]]


def test_turn_rewards_of_one_turn_are_the_single_turn_token_rewards():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).float()
    kl, scores = rand(2, 4, seed=7), torch.tensor([0.7, -3.0])
    truncated = torch.tensor([False, True])
    want = gae.token_rewards(kl * mask, scores, mask, kl_coef=0.2, reward_clip=2.0, ended=~truncated,
                             truncation_penalty=1.0)
    turn_ids = torch.where(mask.bool(), 0, -1)
    got = turns.turn_token_rewards(kl * mask, scores[:, None], turn_ids, kl_coefs=turns.turn_coefficients((0.2,), turn_ids),
                                   reward_clip=2.0, truncated=truncated[:, None], truncation_penalty=1.0)
    assert torch.allclose(got, want)


def naive_gae(rewards, values, gamma, lam):
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]


def test_gae_steps_over_environment_tokens_as_if_they_were_not_there():
    rewards, values = rand(2, 10, seed=8).double(), rand(2, 10, seed=9).double()
    adv, ret = gae.gae_advantages(rewards, values, ACTIONS.double(), gamma=0.9, lam=0.8)
    for b in range(2):
        keep = ACTIONS[b].bool()
        assert adv[b][keep].tolist() == pytest.approx(naive_gae(rewards[b][keep].tolist(), values[b][keep].tolist(), 0.9, 0.8))
        assert adv[b][~keep].abs().sum() == 0 and ret[b][~keep].abs().sum() == 0


def test_gae_of_contiguous_masks_is_bit_identical_to_the_single_turn_recursion():
    """The single-turn formula as it was before multi-turn rollouts: the same bits for every contiguous mask."""
    def before(rewards, values, mask, gamma, lam):
        values, rewards = values * mask, rewards * mask
        advantages, running, next_value = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            running = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running) * mask[:, t]
            advantages[:, t] = running
            next_value = values[:, t]
        return advantages, (advantages + values) * mask

    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).float()
    rewards, values = rand(3, 6, seed=10), rand(3, 6, seed=11)
    for got, want in zip(gae.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95),
                         before(rewards, values, mask, 1.0, 0.95), strict=True):
        assert torch.equal(got, want)


# ---- per-turn returns and advantages ------------------------------------------------------------------


def test_returns_to_go_spread_and_turn_sums_by_hand():
    assert turns.returns_to_go(torch.tensor([[0.1, 1.0, 2.0]])).tolist() == [pytest.approx([3.1, 3.0, 2.0])]
    assert turns.returns_to_go(torch.tensor([[1.0, 1.0]]), gamma=0.5).tolist() == [[1.5, 1.0]]
    spread = turns.spread(torch.tensor([[5.0, 7.0], [1.0, 2.0]]), TURN_IDS)
    assert spread[0].tolist() == [5, 5, 0, 0, 0, 7, 7, 7, 0, 0]
    assert spread[1].tolist() == [1, 1, 1, 0, 0, 2, 0, 0, 0, 0]
    values = torch.arange(20.0).view(2, 10)
    assert turns.turn_sums(values, TURN_IDS, 2).tolist() == [[1.0, 18.0], [33.0, 15.0]]


def test_one_turn_group_advantages_are_grpos():
    scores = torch.tensor([0.0, 1.0, 0.1, 1.0])
    turn_ids = torch.tensor([[0, 0, -1]] * 4)
    per_turn = torch.stack([group_advantages(turns.returns_to_go(scores[:, None])[:, 0], 2)], dim=1)
    assert torch.equal(turns.spread(per_turn, turn_ids)[:, 0], group_advantages(scores, 2))


# ---- SCoRe ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "stage"), [(1, STAGE_ONE), (3, STAGE_ONE), (4, STAGE_TWO), (100, STAGE_TWO)])
def test_the_stage_follows_the_step(step, stage):
    assert stage_of(step, 3) == stage


def test_no_stage_one_steps_is_stage_two_from_the_start():
    assert stage_of(1, 0) == STAGE_TWO


def test_the_stage_two_bonus_matches_a_hand_calculation():
    scores = torch.tensor([[0.1, 1.0],   # wrong -> right: r2 + 10 * 0.9
                           [1.0, 0.0],   # right -> wrong: r2 - 10 * 1.0
                           [1.0, 1.0]])  # right twice: no bonus
    assert shaped_turn_rewards(scores, STAGE_TWO, alpha=10.0).tolist() == [
        pytest.approx([0.1, 10.0]), pytest.approx([1.0, -10.0]), pytest.approx([1.0, 1.0])]
    # Stage I trains the second attempt only: the first attempt's reward is 0.
    assert shaped_turn_rewards(scores, STAGE_ONE, alpha=10.0).tolist() == [[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]]


def test_stage_one_holds_the_first_attempt_with_its_own_kl_weight():
    assert turn_kl_coefs(STAGE_ONE, 0.01, 0.1) == (0.1, 0.01)
    assert turn_kl_coefs(STAGE_TWO, 0.01, 0.1) == (0.01, 0.01)
    hp = Hyperparameters(turns=2, self_correction="score", score_stage_one_steps=2, score_alpha=5.0,
                         score_first_turn_kl_coef=0.3)
    scores = torch.tensor([[0.0, 1.0]])
    plan = turn_plan(scores, step=2, hp=hp, kl_coef=0.02)
    assert (plan.rewards.tolist(), plan.kl_coefs, plan.stage, plan.own_turn_credit) == ([[0.0, 1.0]], (0.3, 0.02),
                                                                                        STAGE_ONE, True)
    plan = turn_plan(scores, step=3, hp=hp, kl_coef=0.02)
    assert (plan.rewards.tolist(), plan.kl_coefs, plan.stage) == ([[0.0, 6.0]], (0.02, 0.02), STAGE_TWO)
    # Without selfCorrection: the scores as they are, one KL weight, credited as returns-to-go.
    plan = turn_plan(torch.tensor([[0.1, 0.2, 0.3]]), step=1, hp=Hyperparameters(turns=3), kl_coef=0.02)
    assert plan.rewards.tolist() == [[pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]]
    assert (plan.kl_coefs, plan.stage, plan.own_turn_credit) == ((0.02,) * 3, None, False)


def test_per_turn_gae_makes_every_turn_its_own_episode():
    rewards, values = rand(2, 10, seed=12).double(), rand(2, 10, seed=13).double()
    adv, ret = turns.per_turn_gae(rewards, values, TURN_IDS, 2, gamma=1.0, lam=0.9)
    for b in range(2):
        for k in range(2):
            keep = TURN_IDS[b] == k
            assert adv[b][keep].tolist() == pytest.approx(naive_gae(rewards[b][keep].tolist(), values[b][keep].tolist(),
                                                                    1.0, 0.9))
        assert adv[b][~ACTIONS[b].bool()].abs().sum() == 0 and ret[b][~ACTIONS[b].bool()].abs().sum() == 0
    # The first turn's last token bootstraps from nothing: its advantage is its own reward minus its value.
    assert adv[0, 1].item() == pytest.approx((rewards[0, 1] - values[0, 1]).item())


def test_correction_metrics_by_hand():
    scores = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.1], [0.1, 0.0]])
    assert correction_metrics(scores, 1.0) == {"accuracy_t1": 0.5, "accuracy_t2": 0.5, "accuracy_delta": 0.0,
                                               "wrong_to_right": 0.25, "right_to_wrong": 0.25}
    stats = turn_stats(types.SimpleNamespace(turn_scores=scores), STAGE_TWO)
    assert stats["score_stage"] == 2.0 and stats["reward_t1"] == pytest.approx(0.525)
    assert turn_stats(types.SimpleNamespace(turn_scores=None), None) == {}
