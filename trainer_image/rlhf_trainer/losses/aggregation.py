"""How per-token policy losses are summed into one loss: the GRPO loss normalisations, by TRL's names.

With l_it the loss of token t of response i, |o_i| its length, N responses and L = max_new_tokens
in the whole step's batch (all micro-batches and data-parallel ranks):
    grpo     Shao et al. 2024, "DeepSeekMath", eq. 3: each response's token mean, then the mean over
             responses:                      1/N sum_i 1/|o_i| sum_t l_it
             (a long response's tokens count less: the length bias Dr. GRPO names)
    dr_grpo  Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
             section 3.2 ("Dr. GRPO", the objective without 1/|o_i|) as TRL implements it, a
             constant normaliser:            1/(N L) sum_i sum_t l_it
    dapo     Yu et al. 2025, "DAPO", section 3.3 (token-level policy gradient loss): the mean over all
             tokens of the batch, 1/(sum_i |o_i|) sum_i sum_t l_it; the project's PPO loss and
             TRL's default
Each is written as per-token weights w_it (0 outside the response mask), loss = sum w_it l_it, so
a micro-batch's share is its own rows' weighted sum and the shares add up to the batch's loss
however the batch was split. The counts given here are what common.global_normaliser returns:
the global count divided by the number of ranks, because DeepSpeed averages gradients over ranks.
"""

from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def token_weights(mask: torch.Tensor, aggregation: str, *, num_tokens: float | torch.Tensor,
                  num_sequences: float | torch.Tensor, max_length: int) -> torch.Tensor:
    """(B, T) response mask -> (B, T) weights of each token's loss for `aggregation`.

    num_tokens: response tokens of the global batch / ranks (dapo); num_sequences: responses of
    the global batch / ranks (grpo, dr_grpo); max_length: max_new_tokens (dr_grpo).
    Raises ValueError for an unknown aggregation.
    """
    mask = mask.to(torch.float32) if not mask.is_floating_point() else mask
    if aggregation == "dapo":
        return mask / num_tokens
    if aggregation == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * num_sequences)
    if aggregation == "dr_grpo":
        return mask / (num_sequences * max_length)
    raise ValueError(f"unknown loss aggregation {aggregation!r} ({' | '.join(LOSS_AGGREGATIONS)})")
