"""Per-turn rewards and advantages of multi-turn rollouts (rlhf_trainer.multiturn).

A rollout of K policy turns has `turn_ids` (B, T): the turn 0..K-1 of each action token, -1 on the
environment's tokens and padding. Every turn k gets its own reward r_k, placed on its last token
(the way losses.gae.token_rewards places a single-turn score on the last token), and a per-token
KL coefficient that may differ per turn (SCoRe's strong first-attempt KL, Kumar et al. 2024, eq. 3):
    reward_t = -c_t * KL_t                       on every action token t (0 on environment tokens)
             + clip(r_k) - penalty * truncated_k  on the last token of turn k
Critic-free estimators work on turn returns instead: the return-to-go of turn k,
    G_k = sum_{j >= k} gamma^(j-k) r_j,
is what turn k's tokens can still change (a later turn cannot change an earlier turn's reward), and
GRPO / RLOO baselines compare G_k with the same turn's G_k of the other samples of the group
(one advantage per turn, spread over its tokens). Credited by turn (SCoRe, self_correction.TurnPlan)
G_k = r_k, and PPO's GAE treats each turn as its own episode (per_turn_gae). With K = 1 every function reduces to its
single-turn counterpart (tested against them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_trainer.losses.gae import gae_advantages


def turn_ends(turn_ids: torch.Tensor, turns: int) -> torch.Tensor:
    """(B, T) turn ids -> (B, K) column of each turn's last token (-1 for a turn with no token)."""
    positions = torch.arange(1, turn_ids.shape[1] + 1, device=turn_ids.device)
    return torch.stack([((turn_ids == k) * positions).max(-1).values - 1 for k in range(turns)], dim=1)


def spread(per_turn: torch.Tensor, turn_ids: torch.Tensor) -> torch.Tensor:
    """(B, K) per-turn values -> (B, T): each action token gets its turn's value, other tokens 0."""
    values = per_turn.gather(1, turn_ids.clamp(min=0))
    return torch.where(turn_ids >= 0, values, torch.zeros_like(values))


def turn_sums(values: torch.Tensor, turn_ids: torch.Tensor, turns: int) -> torch.Tensor:
    """(B, T) per-token values -> (B, K) their sums over each turn's tokens (environment tokens count nowhere)."""
    return torch.stack([(values * (turn_ids == k)).sum(-1) for k in range(turns)], dim=1)


def turn_coefficients(coefficients: Sequence[float], turn_ids: torch.Tensor) -> torch.Tensor:
    """Per-turn coefficients (K,) -> (B, T) float: turn k's tokens get coefficients[k], other tokens 0."""
    table = torch.tensor(list(coefficients), dtype=torch.float32, device=turn_ids.device)
    return spread(table.expand(turn_ids.shape[0], -1), turn_ids)


def returns_to_go(turn_rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(B, K) per-turn rewards -> (B, K) G_k = r_k + gamma * G_{k+1} (G_K = 0)."""
    out = torch.zeros_like(turn_rewards)
    running = torch.zeros_like(turn_rewards[:, 0])
    for k in reversed(range(turn_rewards.shape[1])):
        running = turn_rewards[:, k] + gamma * running
        out[:, k] = running
    return out


def turn_token_rewards(kl: torch.Tensor, turn_rewards: torch.Tensor, turn_ids: torch.Tensor, *,
                       kl_coefs: torch.Tensor, reward_clip: float | None = None,
                       truncated: torch.Tensor | None = None, truncation_penalty: float = 0.0) -> torch.Tensor:
    """PPO's per-token rewards of a multi-turn rollout (module docstring): kl, kl_coefs (B, T), turn
    rewards (B, K), truncated (B, K) bool -> (B, T), 0 on environment tokens and padding.

    kl_coefs: turn_coefficients(...) of the per-turn KL weights. A turn's reward is clipped to
    [-reward_clip, reward_clip] (None: the caller did) and reduced by truncation_penalty when that
    turn sampled no stop token, as losses.gae.token_rewards does for the one turn.
    """
    actions = (turn_ids >= 0).to(kl.dtype)
    rewards = -kl_coefs.to(kl.dtype) * kl * actions
    final = turn_rewards.to(rewards.dtype)
    if reward_clip is not None:
        final = final.clamp(-reward_clip, reward_clip)
    if truncated is not None:
        final = final - truncation_penalty * truncated.to(final.dtype)
    ends = turn_ends(turn_ids, turn_rewards.shape[1])
    has_tokens = ends >= 0
    return rewards.scatter_add(1, ends.clamp(min=0), torch.where(has_tokens, final, torch.zeros_like(final)))


def per_turn_gae(rewards: torch.Tensor, values: torch.Tensor, turn_ids: torch.Tensor, turns: int, *,
                 gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with every turn its own episode (losses.gae.gae_advantages on each turn's tokens alone: the
    last token of a turn bootstraps from nothing), for credit by turn (self_correction.TurnPlan):
    rewards, values, turn_ids (B, T) -> (advantages (B, T), returns (B, T)), 0 off the actions."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for k in range(turns):
        mask = (turn_ids == k).to(rewards.dtype)
        a, r = gae_advantages(rewards * mask, values, mask, gamma=gamma, lam=lam)
        advantages, returns = advantages + a, returns + r
    return advantages, returns
