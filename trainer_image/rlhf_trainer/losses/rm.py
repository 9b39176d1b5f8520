"""Reward-model training: Bradley-Terry pairwise loss on the score of each sequence's last token.

Bradley & Terry 1952; as used by Ouyang et al. 2022 (InstructGPT, eq. 1) and with a margin by
Touvron et al. 2023 (Llama 2, eq. 2):
    L = -log sigmoid(r(x, y_w) - r(x, y_l) - m)
The sequence score r is the head's output at the last real (non-padding) token: the Hugging Face
sequence classifier pools it itself (rlhf_trainer.forward.sequence_scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *,
                       margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """(B,) scores of the chosen and rejected responses -> mean loss over the pairs."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margin).mean()


def preference_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen response scores higher (ties count as wrong)."""
    return (chosen_scores > rejected_scores).float().mean().detach()
