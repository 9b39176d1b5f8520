"""GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024): critic-free policy gradients.

Every prompt is sampled `group_size` times; a response's advantage compares its score with the
others of its group:
- grpo: (score - group mean) / group std, with the KL to the reference as a k3 loss term;
- rloo: score minus the mean of the other samples (leave-one-out), with the KL folded into the score.
The update is the clipped policy loss over `ppo_epochs` passes (one pass = plain policy gradient).
"""

from __future__ import annotations

import torch

from rlhf_trainer import models
from rlhf_trainer.algorithms.common import (
    Scorer,
    drive,
    generate,
    global_normaliser,
    load_records,
    micro_batches,
    policy_logprobs,
    start_colocated,
)
from rlhf_trainer.losses.grpo import group_advantages, k3_kl_loss, rloo_advantages
from rlhf_trainer.losses.kl import kl_estimate
from rlhf_trainer.losses.ppo import policy_loss
from rlhf_trainer.losses.utils import entropy_from_logits, masked_mean
from rlhf_trainer.roles import sequence_logprobs
from rlhf_trainer.runtime import Context
from rlhf_trainer.strategy import DeepSpeedStrategy


class GroupPolicyGradient:
    def __init__(self, ctx: Context, variant: str):
        hp = self.hp = ctx.hp
        self.ctx, self.variant = ctx, variant
        self.tokenizer = models.load_tokenizer(ctx.cfg.model.path)
        rows = ctx.rows_per_rank(hp.group_size)
        self.strategy = DeepSpeedStrategy(
            models.load_policy(ctx.cfg.model.path, seed=hp.seed), ctx.cfg.roles["actor"].deepspeed,
            learning_rate=hp.learning_rate, micro_batch_size=hp.micro_batch_size, grad_accum=ctx.grad_accum(rows),
        )
        self.reference = ctx.client("reference")
        self.score = Scorer(ctx)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics, group = self.hp, self.ctx.metrics, self.hp.group_size
        # 1. rollout: each prompt `group` times, consecutive rows
        records = [r for r in records for _ in range(group)]
        with metrics.phase("generate", timings):
            self.strategy.eval()
            roll = generate(self.strategy.module, self.tokenizer, [r.prompt for r in records], hp)
        seq, attn, mask = roll.sequences, roll.attention_mask, roll.action_mask.float()
        # 2. score
        with metrics.phase("score", timings), torch.no_grad():
            old_logprobs = sequence_logprobs(self.strategy.module, seq, attn, hp.temperature).cpu()
            ref_logprobs = self.reference.call("logprobs", {"input_ids": seq, "attention_mask": attn})[0]["logprobs"]
            scores = self.score(roll.prompts, roll.responses, [r.answer for r in records])
        # 3. advantages, one per response
        seq_kl = (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(-1)
        if self.variant == "rloo":
            advantages = rloo_advantages(scores - hp.kl_coef * seq_kl, group)
        else:
            advantages = group_advantages(scores, group)
        token_advantages = advantages[:, None] * mask
        # 4. update
        num_tokens = global_normaliser(float(mask.sum()))
        with metrics.phase("train", timings):
            self.strategy.train()
            for _ in range(hp.ppo_epochs):
                losses, clipped, entropy = [], [], []
                for mb in micro_batches(len(records), hp.micro_batch_size):
                    logprobs, logits = policy_logprobs(self.strategy, seq[mb], attn[mb], hp.temperature)
                    loss, clip_fraction = policy_loss(
                        logprobs, old_logprobs[mb], token_advantages[mb], mask[mb],
                        clip_range=hp.clip_range, dual_clip=hp.dual_clip, num_tokens=num_tokens,
                    )
                    if self.variant == "grpo":
                        loss = loss + hp.kl_coef * k3_kl_loss(logprobs, ref_logprobs[mb], mask[mb], num_tokens=num_tokens)
                    self.strategy.backward(loss)
                    self.strategy.step()
                    losses.append(float(loss))
                    clipped.append(float(clip_fraction))
                    entropy.append(float(masked_mean(entropy_from_logits(logits.detach()), mask[mb])))
        policy = sum(losses)
        return {
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
            "kl": float(seq_kl.mean()), "kl_coef": hp.kl_coef, "policy_loss": policy, "loss": policy,
            "clip_fraction": sum(clipped) / len(clipped), "entropy": sum(entropy) / len(entropy),
            "response_length": float(mask.sum(-1).mean()), "tokens": float(attn.sum()),
        }


def run(ctx: Context) -> None:
    records = load_records(ctx)
    start_colocated(ctx)
    drive(ctx, GroupPolicyGradient(ctx, ctx.cfg.algorithm), records)
