"""Reward model training: Bradley–Terry on preference pairs (Ouyang et al. 2022), optional margin (Llama 2).

The actor role here is a one-label sequence classifier initialised from `model.path`; its score of a
row is the output at the last real token. The export is a Hugging Face sequence-classification
folder that a PPO / GRPO job's `rewardModel.path` can point at.
"""

from __future__ import annotations

from rlhf_trainer import distributed, models
from rlhf_trainer.algorithms.common import (
    ActorAlgorithm,
    encode_pairs,
    global_normaliser,
    pair_slices,
    run_algorithm,
)
from rlhf_trainer.forward import sequence_scores
from rlhf_trainer.losses.rm import bradley_terry_loss, preference_accuracy
from rlhf_trainer.runtime import Context


class RewardModelTraining(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer):
        # a one-label sequence classifier; a pair is two rows: chosen and rejected
        super().__init__(ctx, renderer, load_model=models.load_reward_model, rows_per_sample=2)

    def step(self, records, timings) -> dict[str, float]:
        hp, n = self.hp, len(records)
        batch = {k: v.to(distributed.device()) for k, v in encode_pairs(records, self.tokenizer.pad_token_id).items()}
        pairs_total = global_normaliser(n)
        losses, correct, chosen_scores = [], 0.0, []
        with self.ctx.metrics.phase("train", timings):
            self.strategy.train()
            for rows in pair_slices(n, hp.micro_batch_size):
                scores = sequence_scores(self.strategy.forward, batch["input_ids"][rows], batch["attention_mask"][rows])
                half = len(rows) // 2
                loss = bradley_terry_loss(scores[:half], scores[half:], margin=hp.margin) * half / pairs_total
                value = self.ctx.guard.backward_step(
                    self.strategy, loss, anchor=scores, role="actor", source="reward-model (Bradley-Terry) loss",
                    records=[records[int(i)] for i in rows[:half]])
                losses.append(value or 0.0)
                correct += float(preference_accuracy(scores[:half], scores[half:])) * half
                chosen_scores.append(float(scores[:half].detach().mean()))
        return {
            "loss": sum(losses), "policy_loss": sum(losses), "preference_accuracy": correct / n,
            "reward_mean": sum(chosen_scores) / len(chosen_scores), "tokens": float(batch["attention_mask"].sum()),
        }


def run(ctx: Context) -> None:
    run_algorithm(ctx, RewardModelTraining)
