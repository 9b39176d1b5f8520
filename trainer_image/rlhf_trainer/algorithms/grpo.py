"""GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024): critic-free policy gradients.

Every prompt is sampled `group_size` times; a response's advantage compares its score with the
others of its group:
- grpo: (score - group mean) / group std, with the KL to the reference as a k3 loss term;
- rloo: score minus the mean of the other samples (leave-one-out), with the KL folded into the score.
The update is the clipped policy loss over `ppo_epochs` passes (one pass = plain policy gradient).
"""

from __future__ import annotations

import torch

from rlhf_trainer import distributed
from rlhf_trainer.algorithms.common import (
    ActorAlgorithm,
    Scorer,
    collect_experience,
    generate,
    global_normaliser,
    response_logprobs,
    rollout_ok,
    run_algorithm,
    skipped_rollout_stats,
    watch_rollout,
    write_samples,
)
from rlhf_trainer.losses.grpo import group_advantages, k3_kl_loss, rloo_advantages
from rlhf_trainer.losses.kl import kl_estimate
from rlhf_trainer.losses.ppo import policy_loss
from rlhf_trainer.losses.utils import entropy_from_logits, masked_mean
from rlhf_trainer.runtime import Context


class GroupPolicyGradient(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer, variant: str):
        super().__init__(ctx, renderer, rows_per_prompt=ctx.hp.group_size)
        self.variant = variant
        self.reference = ctx.client("reference")
        self.score = Scorer(ctx)

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics, group, dev = self.hp, self.ctx.metrics, self.hp.group_size, distributed.device()
        # 1. rollout: each prompt `group` times, consecutive rows
        records = [r for r in records for _ in range(group)]
        with metrics.phase("generate", timings):
            self.strategy.eval()
            roll = generate(self.strategy.module, self.tokenizer, records, hp, self.stop_ids)
        # 2. score. With one pass (GRPO) the weights do not change before the optimizer steps after the
        # last micro-batch, so the sampling-time log-probs are the training forward's: skip that forward.
        reuse = hp.ppo_epochs == 1 and self.variant == "grpo"
        with metrics.phase("score", timings), torch.no_grad():
            exp = collect_experience(self.strategy.module, roll, [r.answer for r in records], hp,
                                     reference=self.reference, score=self.score, old_logprobs=not reuse).to(dev)
        if not rollout_ok(self.ctx, exp, roll, records, self.score.source):
            return skipped_rollout_stats(exp)
        # 3. advantages, one per response, repeated over its tokens
        mask = exp.action_mask.float()
        kl_total = 0.0
        if not reuse:
            exp.kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k1") * mask
            kl_total = float(exp.kl.sum())
        if self.variant == "rloo":
            advantages = rloo_advantages(exp.scores - hp.kl_coef * exp.kl.sum(-1), group)
        else:
            advantages = group_advantages(exp.scores, group)
        exp.advantages = advantages[:, None] * mask
        # 4. update
        num_tokens = global_normaliser(exp.num_tokens)
        reused_kl = []  # (rows, R) per micro-batch: the KL of the sampling-time log-probs (reuse)
        with metrics.phase("train", timings):
            self.strategy.train()
            for _ in range(hp.ppo_epochs):
                stats = []
                for mb in exp.split(hp.micro_batch_size):
                    logprobs, logits = response_logprobs(self.strategy.forward, mb.sequences, mb.attention_mask,
                                                         mb.action_mask.shape[1], hp.temperature)
                    if reuse:
                        mb.old_logprobs = logprobs.detach()
                        reused_kl.append(kl_estimate(mb.old_logprobs, mb.ref_logprobs, "k1") * mb.action_mask)
                    loss, clip_fraction = policy_loss(
                        logprobs, mb.old_logprobs, mb.advantages, mb.action_mask,
                        clip_range=hp.clip_range, dual_clip=hp.dual_clip, num_tokens=num_tokens,
                    )
                    if self.variant == "grpo":
                        loss = loss + hp.kl_coef * k3_kl_loss(logprobs, mb.ref_logprobs, mb.action_mask,
                                                              num_tokens=num_tokens)
                    value = self.ctx.guard.backward_step(self.strategy, loss, anchor=logprobs, role="actor",
                                                         source=f"{self.variant} policy loss")
                    entropy = masked_mean(entropy_from_logits(logits.detach()), mb.action_mask)
                    stats.append((value or 0.0, clip_fraction.item(), entropy.item()))
        if reuse:
            exp.kl = torch.cat(reused_kl)
            kl_total = float(exp.kl.sum())
        write_samples(self.ctx, roll, exp)
        policy = sum(s[0] for s in stats)
        return {**watch_rollout(self.ctx, exp),
            "reward_mean": float(exp.scores.mean()), "reward_std": float(exp.scores.std()),
            "kl": kl_total / len(records), "kl_coef": hp.kl_coef, "policy_loss": policy, "loss": policy,
            "clip_fraction": sum(s[1] for s in stats) / len(stats), "entropy": sum(s[2] for s in stats) / len(stats),
            "response_length": float(mask.sum(-1).mean()), "tokens": float(exp.attention_mask.sum()),
        }


def run(ctx: Context) -> None:
    run_algorithm(ctx, GroupPolicyGradient, ctx.cfg.algorithm)
