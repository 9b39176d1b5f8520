"""REINFORCE++ advantages: discounted returns of the KL-shaped token rewards, whitened over the batch.

Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
section 3 (as OpenRLHF's `advantage_estimator: reinforce` computes it): no critic; every response
token gets r_t = -beta * KL_t and the last one also the score (losses.gae.token_rewards), then
    G_t = sum_{s >= t} gamma^(s-t) r_s                       (eq. "return", per response)
    A_t = (G_t - mean(G)) / std(G)                           (mean, std over every response token
                                                             of the GLOBAL batch, all ranks)
The batch-wide normalisation replaces the critic's baseline; it must be global so every rank
optimises the same objective (losses.utils, "statistics that steer training").
"""

from __future__ import annotations

import torch

from rlhf_trainer.losses.utils import Reduce, identity, masked_whiten


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """(B, T) token rewards and response mask -> (B, T) returns G_t, 0 outside `mask`.

    The mask must be contiguous per row; nothing flows across padding.
    """
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                            reduce: Reduce = identity) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token rewards -> (advantages (B, T) whitened over all ranks' tokens, returns (B, T))."""
    returns = discounted_returns(rewards, mask, gamma=gamma)
    return masked_whiten(returns, mask, reduce=reduce), returns
