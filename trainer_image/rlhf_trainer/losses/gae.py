"""PPO per-token rewards and Generalized Advantage Estimation.

Rewards (Ziegler et al. 2019; Stiennon et al. 2020, eq. 1): every response token t gets
    r_t = -beta * KL_t          (KL_t from losses.kl.kl_estimate, k1 or k3)
and the LAST REAL token additionally gets the sequence score, clipped to [-reward_clip, reward_clip].
A truncated response (no EOS within max_new_tokens) is not given a forced EOS: its score is
reduced by `truncation_penalty` instead, so rambling is discouraged without inventing tokens.

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16):
    delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = sum_l (gamma * lam)^l * delta_{t+l}
with V = 0 after the last real token (the episode ends there); returns R_t = A_t + V_t are the
critic's targets. Positions outside the mask are no steps of the episode: a multi-turn rollout's
environment tokens (rlhf_trainer.multiturn) sit between two action tokens, and GAE passes over them,
the action before them bootstrapping from the value of the action after them (as verl's
compute_gae_advantage_return does over its response_mask).
"""

from __future__ import annotations

import torch

from rlhf_trainer.losses.utils import last_token_index

# Subtracted from the score of a response that hit max_new_tokens without an EOS (the default of
# hyperparameters.truncation_penalty). Rule rewards lie in [0, 1], so 1.0 makes "right but never
# stops" no better than "wrong and stops". 0 suits answers that are complete at max_new_tokens.
TRUNCATION_PENALTY = 1.0


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *, kl_coef: float,
                  reward_clip: float | None = None, ended: torch.Tensor | None = None,
                  truncation_penalty: float = TRUNCATION_PENALTY) -> torch.Tensor:
    """kl, mask (B, T) per-token KL estimate (kl_estimate) and response mask; scores (B,);
    ended (B,) bool, False for truncated responses -> rewards (B, T), 0 outside `mask`.

    `reward_clip` None means the caller already clipped the scores.
    """
    rewards = -kl_coef * kl * mask
    final = scores.to(rewards.dtype)
    if reward_clip is not None:
        final = final.clamp(-reward_clip, reward_clip)
    if ended is not None:
        final = final - truncation_penalty * (~ended.bool()).to(final.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += final
    return rewards


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values, mask (B, T) -> (advantages (B, T), returns (B, T)), 0 outside `mask`.

    Padding after the last real token has V = 0 and r = 0, so the last real token bootstraps from
    nothing; positions outside the mask between real tokens (environment tokens) are skipped:
    the running advantage and the next value carry over them unchanged.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = step
        keep = mask[:, t].bool()
        running = torch.where(keep, step, running)
        next_value = torch.where(keep, values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns
