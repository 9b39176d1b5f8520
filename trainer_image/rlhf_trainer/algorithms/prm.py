"""Process reward model training (`algorithm: prm`): a two-label token classifier learns each step's
correctness at its separator token from TRL's stepwise rows (losses.prm, stepwise.encode_steps).

The actor role here is the classifier, initialised from `model.path` (a causal LM: new head). The
export is a Hugging Face token-classification folder that a PPO job's `reward.type: prm` reads.
Metrics: `step_accuracy` and `first_wrong_step_accuracy` over the step's global batch.
"""

from __future__ import annotations

import torch

from rlhf_trainer import distributed, models
from rlhf_trainer.algorithms.common import ActorAlgorithm, global_normaliser, micro_batches, run_algorithm
from rlhf_trainer.data import StepRecord, position_ids_from_mask
from rlhf_trainer.losses.prm import IGNORE, prm_loss, step_metrics, step_scores
from rlhf_trainer.runtime import Context
from rlhf_trainer.stepwise import encode_steps


def encode_step_records(tokenizer, records: list[StepRecord], hp) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and targets (a step's target at its separator's
    last token, IGNORE elsewhere)."""
    rows, targets = [], []
    for record in records:
        ids, positions = encode_steps(tokenizer, record.prompt, record.steps, hp.step_separator,
                                      max_prompt_length=hp.max_prompt_length, max_completion_length=hp.max_new_tokens)
        row_targets = [IGNORE] * len(ids)
        for position, target in zip(positions, record.targets, strict=False):
            row_targets[position] = target
        rows.append(ids)
        targets.append(row_targets)
    width = max(len(r) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
           "targets": torch.full((len(rows), width), IGNORE)}
    for i, (row, row_targets) in enumerate(zip(rows, targets, strict=True)):
        out["input_ids"][i, :len(row)] = torch.tensor(row)
        out["attention_mask"][i, :len(row)] = 1
        out["targets"][i, :len(row)] = torch.tensor(row_targets)
    return out


class PRMTraining(ActorAlgorithm):
    def __init__(self, ctx: Context):
        super().__init__(ctx, load_model=models.load_token_classifier)

    def step(self, records, timings) -> dict[str, float]:
        hp = self.hp
        batch = {k: v.to(distributed.device()) for k, v in encode_step_records(self.tokenizer, records, hp).items()}
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
