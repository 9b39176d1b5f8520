"""Process reward model training (`algorithm: prm`): a two-label token classifier learns each step's
correctness at its separator token from TRL's stepwise rows (losses.prm; rows tokenized at startup
by rlhf_trainer.tokenized with stepwise.encode_steps).

The actor role here is the classifier, initialised from `model.path` (a causal LM: new head). The
export is a Hugging Face token-classification folder that a PPO job's `reward.type: prm` reads.
Metrics: `step_accuracy` and `first_wrong_step_accuracy` over the step's global batch.
"""

from __future__ import annotations

import torch

from rlhf_trainer import distributed, models
from rlhf_trainer.algorithms.common import ActorAlgorithm, global_normaliser, micro_batches, run_algorithm
from rlhf_trainer.data import pad_right, position_ids_from_mask
from rlhf_trainer.losses.prm import IGNORE, prm_loss, step_metrics, step_scores
from rlhf_trainer.runtime import Context
from rlhf_trainer.tokenized import StepRow


def step_batch(rows: list[StepRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and targets (a step's target at its separator's
    last token, IGNORE elsewhere) of tokenized stepwise rows (rlhf_trainer.tokenized.StepRow)."""
    batch = pad_right([[] for _ in rows], [r.ids for r in rows], pad_token_id)
    targets = torch.full(batch["input_ids"].shape, IGNORE)
    for i, row in enumerate(rows):
        targets[i, list(row.positions)] = torch.tensor(row.targets, dtype=targets.dtype)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "targets": targets}


class PRMTraining(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer):
        super().__init__(ctx, renderer, load_model=models.load_token_classifier)

    def step(self, records, timings) -> dict[str, float]:
        hp = self.hp
        batch = {k: v.to(distributed.device()) for k, v in step_batch(records, self.tokenizer.pad_token_id).items()}
        num_labels = global_normaliser(float((batch["targets"] != IGNORE).sum()))
        losses, scores, targets = [], [], []
        with self.ctx.metrics.phase("train", timings):
            self.strategy.train()
            for mb in micro_batches(len(records), hp.micro_batch_size):
                mask = batch["attention_mask"][mb]
                logits = self.strategy.forward(input_ids=batch["input_ids"][mb], attention_mask=mask,
                                               position_ids=position_ids_from_mask(mask)).logits
                loss = prm_loss(logits, batch["targets"][mb], num_labels=num_labels)
                self.strategy.backward(loss)
                self.strategy.step()
                losses.append(loss.item())
                labelled = batch["targets"][mb] != IGNORE
                row_scores = step_scores(logits.detach())
                scores += [row_scores[i][labelled[i]].tolist() for i in range(labelled.shape[0])]
                targets += [batch["targets"][mb][i][labelled[i]].tolist() for i in range(labelled.shape[0])]
        counts = {k: distributed.all_reduce_sum(v) for k, v in step_metrics(scores, targets).items()}
        return {
            "loss": sum(losses), "policy_loss": sum(losses), "tokens": float(batch["attention_mask"].sum()),
            "step_accuracy": counts["steps_correct"] / max(counts["steps"], 1.0),
            "first_wrong_step_accuracy": counts["first_wrong_correct"] / max(counts["examples"], 1.0),
        }


def run(ctx: Context) -> None:
    run_algorithm(ctx, PRMTraining)
