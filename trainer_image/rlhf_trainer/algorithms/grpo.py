"""Critic-free policy gradients: GRPO (Shao et al. 2024, DeepSeekMath), RLOO (Ahmadian et al. 2024)
and REINFORCE++ (Hu 2025).

Every prompt is sampled `group_size` times; a response's advantage compares its score with the
others of its group, or with the whole batch:
- grpo: (score - group mean) / group std, with the KL to the reference as a k3 loss term;
- rloo: score minus the mean of the other samples (leave-one-out), with the KL folded into the score;
- reinforce_pp: per-token rewards -beta KL_t (+ the score on the last token), discounted returns
  whitened over the global batch (losses.reinforce).
The update is the clipped policy loss (clip-higher with clip_range_high) over `ppo_epochs` passes
(one pass = plain policy gradient), its token losses summed as `loss_aggregation` says
(losses.aggregation: grpo, dr_grpo or dapo, TRL's names).

With `hyperparameters.turns` > 1 (grpo, rloo) a rollout is a conversation (rlhf_trainer.multiturn): each
policy turn is scored, its return-to-go is compared with the same turn of the group, and the environment's
tokens are no actions; `selfCorrection: score` shapes the two attempts' rewards and the KL weight of each
(rlhf_trainer.self_correction).
"""

from __future__ import annotations

import torch

from rlhf_trainer import distributed
from rlhf_trainer.algorithms.common import (
    ActorAlgorithm,
    Scorer,
    collect_experience,
    global_normaliser,
    rollout_ok,
    run_algorithm,
    skipped_rollout_stats,
    watch_rollout,
    write_samples,
)
from rlhf_trainer.forward import rollout_logprobs
from rlhf_trainer.losses.aggregation import token_weights
from rlhf_trainer.losses.gae import token_rewards
from rlhf_trainer.losses.grpo import group_advantages, k3_kl_loss, rloo_advantages
from rlhf_trainer.losses.kl import kl_estimate
from rlhf_trainer.losses.ppo import policy_loss
from rlhf_trainer.losses.reinforce import reinforce_pp_advantages
from rlhf_trainer.losses.turns import returns_to_go, spread, turn_coefficients, turn_sums
from rlhf_trainer.losses.utils import entropy_from_logits, masked_mean
from rlhf_trainer.multiturn import environment_of, rollout, turn_stats
from rlhf_trainer.runtime import Context
from rlhf_trainer.self_correction import turn_plan


class GroupPolicyGradient(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer, variant: str):
        super().__init__(ctx, renderer, rows_per_prompt=ctx.hp.group_size)
        self.variant = variant
        self.reference = ctx.client("reference")
        self.score = Scorer(ctx, self.tokenizer)
        self.environment = environment_of(self.hp)

    def advantages(self, exp, mask) -> torch.Tensor:
        """(B, R) advantages of the rollout for this variant (exp.kl set unless GRPO reuses log-probs)."""
        hp = self.hp
        if self.variant == "reinforce_pp":
            rewards = token_rewards(exp.kl, exp.scores, mask, kl_coef=hp.kl_coef, reward_clip=hp.reward_clip,
                                    ended=~exp.truncated, truncation_penalty=hp.truncation_penalty)
            if exp.step_rewards is not None:
                rewards = rewards + exp.step_rewards * mask
            advantages, exp.returns = reinforce_pp_advantages(rewards, mask, gamma=hp.gamma,
                                                              reduce=distributed.all_reduce_tensor)
            return advantages
        if exp.turn_ids is not None:
            return self.turn_advantages(exp, mask)
        # A process reward model's step rewards count at their tokens in REINFORCE++'s returns (above)
        # and summed into the response's score for the group baselines.
        scores = exp.scores if exp.step_rewards is None else exp.scores + exp.step_rewards.sum(-1)
        if self.variant == "rloo":
            return rloo_advantages(scores - hp.kl_coef * exp.kl.sum(-1), hp.group_size)[:, None] * mask
        return group_advantages(scores, hp.group_size)[:, None] * mask

    def turn_advantages(self, exp, mask) -> torch.Tensor:
        """(B, R) advantages of a multi-turn rollout (losses.turns): each turn's return-to-go against
        the same turn of its group, or its own reward when credited by turn (SCoRe); rloo: with each turn's KL,
        times its coefficient, taken off its reward."""
        hp, turns = self.hp, exp.turn_rewards.shape[1]
        rewards = exp.turn_rewards
        if self.variant == "rloo":
            rewards = rewards - turn_sums(exp.kl_coefs * exp.kl, exp.turn_ids, turns)
        estimator = rloo_advantages if self.variant == "rloo" else group_advantages
        returns = rewards if exp.own_turn_credit else returns_to_go(rewards)
        per_turn = torch.stack([estimator(returns[:, k], hp.group_size) for k in range(turns)], dim=1)
        return spread(per_turn, exp.turn_ids) * mask

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics, group, dev = self.hp, self.ctx.metrics, self.hp.group_size, distributed.device()
        # 1. rollout: each prompt `group` times, consecutive rows
        records = [r for r in records for _ in range(group)]
        with metrics.phase("generate", timings):
            self.strategy.eval()
            roll = rollout(self.strategy.module, self.renderer, records, hp, self.environment,
                           synced_gpus=self.strategy.synced_generation)
        # 2. score. With one pass (GRPO) the weights do not change before the optimizer steps after the
        # last micro-batch, so the sampling-time log-probs are the training forward's: skip that forward.
        reuse = hp.ppo_epochs == 1 and self.variant == "grpo"
        with metrics.phase("score", timings), torch.no_grad():
            exp = collect_experience(self.strategy.module, roll, [r.answer for r in records], hp,
                                     reference=self.reference, score=self.score, old_logprobs=not reuse).to(dev)
        if not rollout_ok(self.ctx, exp, roll, records, self.score.source):
            return skipped_rollout_stats(exp)
        # 3. advantages: one per response repeated over its tokens (grpo, rloo), or per token (reinforce_pp);
        # a multi-turn rollout: one per turn (losses.turns), SCoRe's shaped rewards and KL weights
        mask = exp.action_mask.float()
        stage = None
        if exp.turn_ids is not None:
            plan = turn_plan(exp.turn_scores, step=self.ctx.guard.step, hp=hp, kl_coef=hp.kl_coef)
            exp.turn_rewards, exp.own_turn_credit, stage = plan.rewards, plan.own_turn_credit, plan.stage
            exp.kl_coefs = turn_coefficients(plan.kl_coefs, exp.turn_ids)
        kl_total = 0.0
        if not reuse:
            estimator = hp.kl_estimator if self.variant == "reinforce_pp" else "k1"
            exp.kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, estimator) * mask
            kl_total = float(exp.kl.sum())
        exp.advantages = self.advantages(exp, mask)
        # 4. update
        num_tokens = global_normaliser(exp.num_tokens)
        num_sequences = global_normaliser(len(records))
        reused_kl = []  # (rows, R) per micro-batch: the KL of the sampling-time log-probs (reuse)
        with metrics.phase("train", timings):
            self.strategy.train()
            for _ in range(hp.ppo_epochs):
                stats = []
                for mb in exp.split(hp.micro_batch_size):
                    logprobs, logits = rollout_logprobs(self.strategy.forward, mb.sequences, mb.attention_mask,
                                                        temperature=hp.temperature, prefix_sharing=hp.prefix_sharing,
                                                        padding_free=hp.padding_free,
                                                        response_length=mb.action_mask.shape[1])
                    if reuse:
                        mb.old_logprobs = logprobs.detach()
                        reused_kl.append(kl_estimate(mb.old_logprobs, mb.ref_logprobs, "k1") * mb.action_mask)
                    weights = token_weights(mb.action_mask, hp.loss_aggregation, num_tokens=num_tokens,
                                            num_sequences=num_sequences, max_length=hp.max_new_tokens)
                    loss, clip_fraction = policy_loss(
                        logprobs, mb.old_logprobs, mb.advantages, mb.action_mask, clip_range=hp.clip_range,
                        clip_range_high=hp.clip_range_high or None, dual_clip=hp.dual_clip, weights=weights,
                    )
                    if self.variant == "grpo" and mb.kl_coefs is not None:  # per-turn KL weights
                        loss = loss + k3_kl_loss(logprobs, mb.ref_logprobs, mb.action_mask,
                                                 weights=weights * mb.kl_coefs)
                    elif self.variant == "grpo":
                        loss = loss + hp.kl_coef * k3_kl_loss(logprobs, mb.ref_logprobs, mb.action_mask,
                                                              weights=weights)
                    value = self.ctx.guard.backward_step(self.strategy, loss, anchor=logprobs, role="actor",
                                                         source=f"{self.variant} policy loss")
                    entropy = masked_mean(entropy_from_logits(logits.detach(), hp.temperature), mb.action_mask)
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
            **({"process_reward": float(exp.step_rewards.sum(-1).mean())} if exp.step_rewards is not None else {}),
            **turn_stats(exp, stage),
        }


def run(ctx: Context) -> None:
    run_algorithm(ctx, GroupPolicyGradient, ctx.cfg.algorithm)
