"""Supervised fine-tuning: next-token cross-entropy on the response tokens only (prompt labels -100),
optionally packing several examples into one row (positions restart and labels are masked at each
example's boundary, so examples never attend to or predict each other).
"""

from __future__ import annotations

from rlhf_trainer import distributed
from rlhf_trainer.algorithms.common import (
    ActorAlgorithm,
    global_normaliser,
    micro_batches,
    run_algorithm,
)
from rlhf_trainer.data import pad_right, position_ids_from_mask
from rlhf_trainer.losses.sft import pack_examples, sft_loss
from rlhf_trainer.runtime import Context


class SFT(ActorAlgorithm):

    def step(self, records, timings) -> dict[str, float]:
        hp = self.hp
        batch = pad_right([r.prompt for r in records], [r.response for r in records], self.tokenizer.pad_token_id)
        labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
        position_ids = position_ids_from_mask(batch["attention_mask"])
        if hp.packing:
            # Packed rows have no attention mask: positions restart per example instead.
            batch, labels, position_ids = pack_examples(batch, labels, pad_token_id=self.tokenizer.pad_token_id)
        dev = distributed.device()
        ids, labels, position_ids = batch["input_ids"].to(dev), labels.to(dev), position_ids.to(dev)
        attention = batch["attention_mask"].to(dev) if "attention_mask" in batch else None
        num_tokens = global_normaliser(float((labels[:, 1:] != -100).sum()))
        losses = []
        with self.ctx.metrics.phase("train", timings):
            self.strategy.train()
            # With packing there are fewer rows than examples; the accumulation steps stay fixed.
            slices = list(micro_batches(labels.shape[0], hp.micro_batch_size))
            for i in range(self.strategy.engine.gradient_accumulation_steps()):
                mb = slices[i] if i < len(slices) else slice(0, 0)
                if mb.stop == mb.start:
                    # Keep DeepSpeed's micro-step count (and the collectives) aligned: a zero loss.
                    mb = slice(0, 1)
                    scale = 0.0
                else:
                    scale = 1.0
                logits = self.strategy.forward(
                    input_ids=ids[mb], attention_mask=None if attention is None else attention[mb],
                    position_ids=position_ids[mb], use_cache=False,
                ).logits
                loss = sft_loss(logits, labels[mb], num_tokens=num_tokens) * scale
                value = self.ctx.guard.backward_step(self.strategy, loss, anchor=logits, role="actor",
                                                     source="sft loss", records=() if hp.packing else records[mb])
                losses.append(value or 0.0)
        tokens = float((ids != self.tokenizer.pad_token_id).sum())
        return {"loss": sum(losses), "policy_loss": sum(losses), "tokens": tokens}


def run(ctx: Context) -> None:
    run_algorithm(ctx, SFT)
