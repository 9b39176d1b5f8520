"""PPO (Schulman et al. 2017) for language models, as in Ziegler et al. 2019 / Ouyang et al. 2022.

One step: rollout (sample responses) -> score (actor and reference log-probs, critic values,
reward) -> advantages (per-token KL penalty + score on the last token, GAE) -> update (clipped
policy loss here, clipped value loss on the critic role), `ppo_epochs` times over the batch.

Run by `python -m rlhf_trainer` in the actor's pods; the critic and reference (and reward, for a
model reward) answer over the bridge or in-process when colocated.
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
from rlhf_trainer.losses.gae import gae_advantages, token_rewards
from rlhf_trainer.losses.kl import build_kl_controller, kl_estimate
from rlhf_trainer.losses.ppo import policy_loss
from rlhf_trainer.losses.utils import entropy_from_logits, masked_mean, masked_whiten
from rlhf_trainer.roles import sequence_logprobs
from rlhf_trainer.runtime import Context
from rlhf_trainer.strategy import DeepSpeedStrategy


class PPO:
    def __init__(self, ctx: Context):
        hp = self.hp = ctx.hp
        self.ctx = ctx
        self.tokenizer = models.load_tokenizer(ctx.cfg.model.path)
        rows = ctx.rows_per_rank()
        self.strategy = DeepSpeedStrategy(
            models.load_policy(ctx.cfg.model.path, seed=hp.seed), ctx.cfg.roles["actor"].deepspeed,
            learning_rate=hp.learning_rate, micro_batch_size=hp.micro_batch_size, grad_accum=ctx.grad_accum(rows),
        )
        self.reference, self.critic = ctx.client("reference"), ctx.client("critic")
        self.score = Scorer(ctx)
        self.kl_ctl = build_kl_controller(hp.kl_coef, hp.kl_target, hp.kl_horizon)

    def state_dict(self):
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state):
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics = self.hp, self.ctx.metrics
        # 1. rollout
        with metrics.phase("generate", timings):
            self.strategy.eval()
            roll = generate(self.strategy.module, self.tokenizer, [r.prompt for r in records], hp)
        seq, attn, mask = roll.sequences, roll.attention_mask, roll.action_mask.float()
        # 2. score: old policy, reference, critic, reward
        with metrics.phase("score", timings), torch.no_grad():
            old_logprobs = sequence_logprobs(self.strategy.module, seq, attn, hp.temperature).cpu()
            ref_logprobs = self.reference.call("logprobs", {"input_ids": seq, "attention_mask": attn})[0]["logprobs"]
            values = self.critic.call("values", {"input_ids": seq, "attention_mask": attn})[0]["values"][:, :-1]
            scores = self.score(roll.prompts, roll.responses, [r.answer for r in records])
        # 3. advantages
        kl = kl_estimate(old_logprobs, ref_logprobs, hp.kl_estimator) * mask
        rewards = token_rewards(kl, scores.clamp(-hp.reward_clip, hp.reward_clip), mask,
                                kl_coef=self.kl_ctl.value, ended=roll.ended)
        advantages, returns = gae_advantages(rewards, values, mask, gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        # 4. update: the policy here, the critic on its role
        num_tokens = global_normaliser(float(mask.sum()))
        with metrics.phase("train", timings):
            self.strategy.train()
            for _ in range(hp.ppo_epochs):
                losses, clipped, entropy = [], [], []
                for mb in micro_batches(len(records), hp.micro_batch_size):
                    logprobs, logits = policy_logprobs(self.strategy, seq[mb], attn[mb], hp.temperature)
                    loss, clip_fraction = policy_loss(
                        logprobs, old_logprobs[mb], advantages[mb], mask[mb],
                        clip_range=hp.clip_range, dual_clip=hp.dual_clip, num_tokens=num_tokens,
                    )
                    self.strategy.backward(loss)
                    self.strategy.step()
                    losses.append(float(loss))
                    clipped.append(float(clip_fraction))
                    entropy.append(float(masked_mean(entropy_from_logits(logits.detach()), mask[mb])))
                critic_out = self.critic.call("train", {
                    "input_ids": seq, "attention_mask": attn, "old_values": values,
                    "returns": returns, "action_mask": mask,
                })[1]
        mean_kl = float((kl.sum(-1)).mean())
        self.kl_ctl.update(mean_kl, len(records))
        policy = sum(losses)
        return {
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": mean_kl, "kl_coef": self.kl_ctl.value, "policy_loss": policy,
            "value_loss": critic_out["value_loss"], "loss": policy + hp.vf_coef * critic_out["value_loss"],
            "clip_fraction": sum(clipped) / len(clipped), "entropy": sum(entropy) / len(entropy),
            "response_length": float(mask.sum(-1).mean()), "tokens": float(attn.sum()),
        }


def run(ctx: Context) -> None:
    records = load_records(ctx)
    start_colocated(ctx)
    drive(ctx, PPO(ctx), records)
