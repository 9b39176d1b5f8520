"""SimPO: a reference-free preference loss on length-normalised log-probs.

Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6:
    L = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )
with gamma the target reward margin (TRL's CPOTrainer, loss_type "simpo": `simpo_gamma`), and the
cDPO label smoothing e of dpo.py applied the same way:
    -(1 - e) log sigmoid(z) - e log sigmoid(-z)
Inputs are token-AVERAGED sequence log-probs (dpo.preference_logprobs with loss type "simpo");
the implicit reward of a response is beta * its average log-prob.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_trainer.losses.dpo import DPOOutput


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> DPOOutput:
    """(B,) average log-probs of chosen and rejected responses -> the mean loss over the pairs."""
    z = beta * (chosen - rejected) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    chosen_rewards, rejected_rewards = (beta * chosen).detach(), (beta * rejected).detach()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards, accuracy)
