"""PPO-ptx: the pretraining term of the RLHF objective, a language-modelling loss on pretraining text.

Ouyang et al. 2022 (InstructGPT), eq. 2:
    objective(phi) = E_{(x,y) ~ pi_RL}[ r(x, y) - beta log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma E_{x ~ D_pretrain}[ log pi_RL(x) ]
As a loss, the actor's update adds gamma times the next-token cross-entropy of a pretraining
batch (every real token learned, none masked as a prompt), per token over the global pretraining
batch (losses.sft's normalisation). gamma is `ptx_coef`; OpenRLHF computes this term only when
pretraining data is given, and so does the PPO loop here.
"""

from __future__ import annotations

import torch

from rlhf_trainer.losses.sft import IGNORE_INDEX, sft_loss


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded text rows -> (B, T) labels: the ids, IGNORE_INDEX on padding."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, *, coef: float,
             num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) logits, (B, T) lm_labels -> coef * sum of next-token CE / num_tokens."""
    return coef * sft_loss(logits, labels, num_tokens=num_tokens)
