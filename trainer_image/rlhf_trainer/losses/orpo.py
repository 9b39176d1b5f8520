"""ORPO: supervised fine-tuning on the chosen response plus an odds-ratio preference term, no reference.

Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
eqs. 6-7 (with P(y|x) the exponentiated token-AVERAGED log-prob, eq. 4):
    odds(y|x) = P(y|x) / (1 - P(y|x))
    L_OR      = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )
    L_ORPO    = L_SFT(y_w) + lambda * L_OR
lambda is the `beta` hyperparameter, as in TRL's ORPOConfig. L_SFT is the chosen responses'
token-level negative log-likelihood (losses.sft's normalisation: the global count of chosen
response tokens); this module returns the per-pair odds-ratio term and the implicit rewards
beta * average log-prob (TRL's `chosen_rewards`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_trainer.losses.dpo import DPOOutput

# log(1 - P) is -inf at P = 1 (an average log-prob of exactly 0); keep it finite.
_MAX_AVERAGE_LOGPROB = -1e-6


def log_odds(average_logprobs: torch.Tensor) -> torch.Tensor:
    """(B,) average log-probs log P -> (B,) log(P / (1 - P)) = log P - log(1 - exp(log P))."""
    logp = average_logprobs.clamp(max=_MAX_AVERAGE_LOGPROB)
    return logp - torch.log(-torch.expm1(logp))


def odds_ratio_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float) -> DPOOutput:
    """(B,) average log-probs -> DPOOutput whose loss is the MEAN over pairs of lambda * L_OR
    (the loop adds the NLL of the chosen tokens); rewards beta * average log-prob."""
    losses = -beta * F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    chosen_rewards, rejected_rewards = (beta * chosen).detach(), (beta * rejected).detach()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards, accuracy)
