"""PPO clipped policy loss (with optional dual clip) and clipped value loss.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (written as a loss):
    L_clip = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),   rho = exp(logp - logp_old)
Clip-higher (Yu et al. 2025, "DAPO", section 3.1 and its objective): the ratio is clipped to [1 - eps_low, 1 + eps_high]
with eps_high > eps_low, so low-probability tokens with a positive advantage can grow further
(TRL's epsilon / epsilon_high). clip_range_high None means symmetric.
Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5): for
A < 0 the loss is also bounded by -c * A (c > 1), so a huge ratio on a bad action cannot blow up:
    L = min(L_clip, -c * A)  where A < 0
Entropy bonus (Schulman et al. 2017, eq. 9: L = L_clip - c_2 S[pi](s_t)), the mean entropy of the
policy's token distributions over the response, subtracted from the loss with coefficient c_2:
    L_S = -c_2 * H(pi(. | s_t)),   H = logsumexp(z) - sum(softmax(z) * z)
Value loss, clipped around the rollout's values like OpenAI baselines' PPO2:
    L_V = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)

Token-level averaging over the GLOBAL batch: every micro-batch divides its token sum by
`num_tokens`, the number of response tokens in the whole step's batch (all micro-batches, all
data-parallel ranks), so accumulated gradients equal those of one big batch regardless of how it
was split and of how long each response is. Other aggregations (GRPO's per-sequence mean, Dr.
GRPO's constant) pass per-token `weights` from losses.aggregation instead.
"""

from __future__ import annotations

import torch

from rlhf_trainer.losses.utils import entropy_from_logits, masked_mean


def _normaliser(mask: torch.Tensor, num_tokens: float | torch.Tensor | None) -> torch.Tensor | float:
    return mask.sum().clamp(min=1) if num_tokens is None else num_tokens


def _weighted(per_token: torch.Tensor, mask: torch.Tensor, num_tokens, weights) -> torch.Tensor:
    if weights is not None:
        return (per_token * weights).sum()
    return (per_token * mask).sum() / _normaliser(mask, num_tokens)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_range: float, clip_range_high: float | None = None,
                dual_clip: float = 0.0, num_tokens: float | torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (B, T) -> (loss, clip_fraction over `mask`).

    loss = sum of per-token losses / num_tokens, or sum(per-token loss * weights) when (B, T)
    `weights` (0 outside the mask; losses.aggregation.token_weights) are given.
    `dual_clip` 0 turns the dual clip off; otherwise it must be > 1. clip_fraction is the share of
    tokens whose ratio lies outside [1 - eps_low, 1 + eps_high] (a statistic, not differentiated).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be 0 (off) or > 1, got {dual_clip}")
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    loss = _weighted(per_token, mask, num_tokens, weights)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio < 1.0 - clip_range) | (ratio > 1.0 + high)).float(), mask)
    return loss, clip_fraction


def entropy_bonus(logits: torch.Tensor, mask: torch.Tensor, *, coef: float,
                  num_tokens: float | torch.Tensor | None = None,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) mask -> (loss term -coef * sum of masked entropies / num_tokens, mean masked
    entropy). Added to policy_loss's result it makes the gradient of L_clip - c_2 * mean entropy over the
    global batch (the same normaliser). The entropy is that of softmax(logits / temperature), the
    sampling distribution; it is differentiated only when coef > 0.
    """
    if not coef:
        with torch.no_grad():
            entropy = entropy_from_logits(logits, temperature)
        return torch.zeros((), dtype=entropy.dtype, device=entropy.device), masked_mean(entropy, mask)
    entropy = entropy_from_logits(logits, temperature)
    term = -coef * (entropy * mask).sum() / _normaliser(mask, num_tokens)
    return term, masked_mean(entropy.detach(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               *, clip_range: float, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """All (B, T) -> 0.5 * (clipped) squared error summed over `mask`, divided by num_tokens.

    clip_range 0 means no clipping.
    """
    per_token = (values - returns) ** 2
    if clip_range > 0:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        per_token = torch.maximum(per_token, (clipped_values - returns) ** 2)
    return 0.5 * (per_token * mask).sum() / _normaliser(mask, num_tokens)
