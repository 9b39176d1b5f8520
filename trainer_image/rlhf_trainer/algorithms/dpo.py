"""DPO (Rafailov et al. 2023) and its variants: IPO (Azar et al. 2023), hinge (SLiC), cDPO label smoothing.

One step: the reference role's log-probs of chosen and rejected responses, then per micro-batch the
policy's log-probs and the preference loss on the difference of the two log-ratios. No sampling.
"""

from __future__ import annotations

import torch

from rlhf_trainer import distributed
from rlhf_trainer.algorithms.common import (
    ActorAlgorithm,
    encode_pairs,
    global_normaliser,
    pair_slices,
    run_algorithm,
)
from rlhf_trainer.losses.dpo import dpo_loss
from rlhf_trainer.roles import sequence_logprobs
from rlhf_trainer.runtime import Context


def summed_logprobs(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(R, T-1) token log-probs -> (R,) log-probability of each row's response."""
    return (logprobs * loss_mask[:, 1:].to(logprobs.dtype)).sum(-1)


class DPO(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer):
        super().__init__(ctx, renderer, rows_per_sample=2)  # a pair is two rows: chosen and rejected
        self.reference = ctx.client("reference")

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics, n = self.hp, self.ctx.metrics, len(records)
        batch = {k: v.to(distributed.device()) for k, v in encode_pairs(records, self.tokenizer.pad_token_id).items()}
        ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        with metrics.phase("score", timings):
            ref_logprobs = self.reference.call("logprobs", {"input_ids": ids, "attention_mask": attn})[0]["logprobs"]
            ref = summed_logprobs(ref_logprobs.to(ids.device), loss_mask)
        if not self.ctx.guard.batch_ok("experience", {"ref_logprobs": ref.view(2, n).T}, records,
                                       source="the reference forward (chosen, rejected)"):
            return {"tokens": 0.0}
        pairs_total = global_normaliser(n)
        losses, correct, margins = [], 0.0, []
        with metrics.phase("train", timings):
            self.strategy.train()
            for rows in pair_slices(n, hp.micro_batch_size):
                logp = summed_logprobs(sequence_logprobs(self.strategy.forward, ids[rows], attn[rows]), loss_mask[rows])
                half = len(rows) // 2
                loss, chosen_reward, rejected_reward, accuracy = dpo_loss(
                    logp[:half], logp[half:], ref[rows][:half], ref[rows][half:],
                    beta=hp.beta, loss_type=hp.loss_type, label_smoothing=hp.label_smoothing,
                )
                # dpo_loss averages over its pairs; rescale to a share of the whole batch's mean.
                loss = loss * half / pairs_total
                value = self.ctx.guard.backward_step(
                    self.strategy, loss, anchor=logp, role="actor", source=f"dpo ({hp.loss_type}) loss",
                    records=[records[int(i)] for i in rows[:half]])
                losses.append(value or 0.0)
                correct += float(accuracy) * half
                margins.append(float((chosen_reward - rejected_reward).mean()))
        return {
            "policy_loss": sum(losses), "loss": sum(losses), "preference_accuracy": correct / n,
            "reward_mean": sum(margins) / len(margins), "tokens": float(attn.sum()),
        }


def run(ctx: Context) -> None:
    run_algorithm(ctx, DPO)
