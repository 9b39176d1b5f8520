"""Critic-free advantages from groups of samples per prompt, and the GRPO loss.

GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3 and section 4.1.2): G responses per prompt,
    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)      (unbiased std, as TRL)
given to every token of response i, and a KL penalty added to the loss (not the reward) with
the k3 estimator:
    L = L_clip(A) + beta * k3(pi, pi_ref)
RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", eq. 6):
    A_i = r_i - 1/(G-1) * sum_{j != i} r_j
Scores are laid out prompt-major: rows [p0 s0, p0 s1, ..., p0 s{G-1}, p1 s0, ...].
"""

from __future__ import annotations

import torch

from rlhf_trainer.losses.kl import kl_k3


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size} (>= 2)")
    return scores.float().view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, *, scale_by_std: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """(B*G,) scores -> (B*G,) group-normalised advantages (a group of equal scores gives 0)."""
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B*G,) scores -> (B*G,) score minus the mean of the other G-1 scores of its prompt."""
    groups = _groups(scores, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).view(-1)


def k3_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
               num_tokens: float | torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's KL term: k3(pi, pi_ref) summed over `mask` / num_tokens (the policy loss's normaliser),
    or summed with the policy loss's (B, T) `weights` (losses.aggregation), as TRL adds beta * KL to
    each token's loss before aggregating.

    The loop adds `kl_coef * k3_kl_loss(...)` to ppo.policy_loss(...) with the row's advantage
    broadcast over its tokens.
    """
    if weights is not None:
        return (kl_k3(logprobs, ref_logprobs) * weights).sum()
    norm = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    return (kl_k3(logprobs, ref_logprobs) * mask).sum() / norm
