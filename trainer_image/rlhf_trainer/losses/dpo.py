"""Direct preference optimisation losses, from sequence log-probs of policy and reference.

With h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)):
    sigmoid  Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:  -log sigmoid(beta h)
    cDPO     Mitchell 2023, "A note on DPO with noisy preferences": with label smoothing e,
             -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo      Azar et al. 2023, "A General Theoretical Paradigm ...", eq. 17:  (h - 1/(2 beta))^2
             on TOKEN-AVERAGED sequence log-probs (as TRL's DPOTrainer: the target 1/(2 beta) is
             then the same for pairs of any lengths; on sums a long pair overshoots it)
    hinge    Zhao et al. 2023, "SLiC-HF", eq. 1 with beta = 1/delta:  max(0, 1 - beta h)
Implicit rewards beta * (log pi - log pi_ref) of chosen and rejected are returned for metrics;
accuracy is the share of pairs whose chosen reward is higher.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_trainer.losses.utils import masked_sum

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# Losses whose sequence log-prob is the mean over the response tokens, not the sum.
TOKEN_AVERAGED = ("ipo", "simpo", "orpo")


class DPOOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean over pairs
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached
    accuracy: torch.Tensor  # scalar in [0, 1]


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """(B, T) token log-probs -> (B,) sum (or mean) over the response tokens in `mask`."""
    total = masked_sum(logprobs, mask, dim=-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def preference_logprobs(token_logprobs: torch.Tensor, loss_mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """(N, C) log-probs of each row's last C tokens (C = T-1: tokens 1..T-1) and the (N, T) response
    mask of the encoded rows -> (N,) sequence log-probs as `loss_type` defines them: averaged for
    TOKEN_AVERAGED, else summed.

    The reference's and the policy's log-probs of a pair must both go through here.
    """
    mask = loss_mask[:, -token_logprobs.shape[1]:].to(token_logprobs.dtype)
    return sequence_logprobs(token_logprobs, mask, average=loss_type in TOKEN_AVERAGED)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> DPOOutput:
    """All inputs (B,) sequence log-probs; `label_smoothing` applies to the sigmoid loss (cDPO)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} ({' | '.join(LOSS_TYPES)})")
    chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards, accuracy)
