"""PPO (Schulman et al. 2017) for language models, as in Ziegler et al. 2019 / Ouyang et al. 2022.

One step: rollout (sample responses) -> score (actor and reference log-probs, critic values,
reward) -> advantages (per-token KL penalty + score on the last token, GAE) -> update (clipped
policy loss here, clipped value loss on the critic role), `ppo_epochs` times over the batch.

Run by `python -m rlhf_trainer` in the actor's pods; the critic and reference (and reward, for a
model reward) answer over the bridge or in-process when colocated.
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
from rlhf_trainer.losses.gae import gae_advantages, token_rewards
from rlhf_trainer.losses.kl import build_kl_controller, kl_estimate
from rlhf_trainer.losses.ppo import entropy_bonus, policy_loss
from rlhf_trainer.losses.utils import masked_whiten
from rlhf_trainer.runtime import Context


class PPO(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer):
        super().__init__(ctx, renderer)
        hp = self.hp
        self.reference, self.critic = ctx.client("reference"), ctx.client("critic")
        self.score = Scorer(ctx)
        self.kl_ctl = build_kl_controller(hp.kl_coef, hp.kl_target, hp.kl_horizon)

    def state_dict(self):
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state):
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics, dev = self.hp, self.ctx.metrics, distributed.device()
        # 1. rollout
        with metrics.phase("generate", timings):
            self.strategy.eval()
            roll = generate(self.strategy.module, self.tokenizer, records, hp, self.stop_ids)
        # 2. score: old policy, reference, critic, reward
        with metrics.phase("score", timings), torch.no_grad():
            exp = collect_experience(self.strategy.module, roll, [r.answer for r in records], hp,
                                     reference=self.reference, score=self.score, critic=self.critic).to(dev)
        if not rollout_ok(self.ctx, exp, roll, records, self.score.source):
            return skipped_rollout_stats(exp)
        # 3. advantages
        mask = exp.action_mask.float()
        exp.kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, hp.kl_estimator) * mask
        exp.rewards = token_rewards(exp.kl, exp.scores, mask, kl_coef=self.kl_ctl.value, reward_clip=hp.reward_clip,
                                    ended=~exp.truncated, truncation_penalty=hp.truncation_penalty)
        exp.advantages, exp.returns = gae_advantages(exp.rewards, exp.values, mask, gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages:
            exp.advantages = masked_whiten(exp.advantages, mask)
        write_samples(self.ctx, roll, exp)
        # 4. update: the policy here, the critic on its role
        num_tokens = global_normaliser(exp.num_tokens)
        with metrics.phase("train", timings):
            self.strategy.train()
            for _ in range(hp.ppo_epochs):
                stats = []
                for mb in exp.split(hp.micro_batch_size):
                    logprobs, logits = response_logprobs(self.strategy.forward, mb.sequences, mb.attention_mask,
                                                         mb.action_mask.shape[1], hp.temperature)
                    loss, clip_fraction = policy_loss(
                        logprobs, mb.old_logprobs, mb.advantages, mb.action_mask,
                        clip_range=hp.clip_range, dual_clip=hp.dual_clip, num_tokens=num_tokens,
                    )
                    bonus, entropy = entropy_bonus(logits, mb.action_mask, coef=hp.entropy_coef, num_tokens=num_tokens)
                    loss = loss + bonus
                    value = self.ctx.guard.backward_step(self.strategy, loss, anchor=logprobs, role="actor",
                                                         source="ppo policy loss")
                    stats.append((value or 0.0, clip_fraction.item(), entropy.item()))
                value_loss = self.critic.call("train", {
                    "input_ids": exp.sequences, "attention_mask": exp.attention_mask, "old_values": exp.values,
                    "returns": exp.returns, "action_mask": exp.action_mask,
                }, step=self.ctx.guard.step)[1]["value_loss"]
        mean_kl = float(exp.kl.sum(-1).mean())
        self.kl_ctl.update(mean_kl, len(records))
        policy = sum(s[0] for s in stats)
        return {
            **watch_rollout(self.ctx, exp),
            "reward_mean": float(exp.scores.mean()), "reward_std": float(exp.scores.std()) if len(records) > 1 else 0.0,
            "kl": mean_kl, "kl_coef": self.kl_ctl.value, "policy_loss": policy, "value_loss": value_loss,
            "loss": policy + hp.vf_coef * value_loss, "clip_fraction": sum(s[1] for s in stats) / len(stats),
            "entropy": sum(s[2] for s in stats) / len(stats), "response_length": float(mask.sum(-1).mean()),
            "tokens": float(exp.attention_mask.sum()),
        }


def run(ctx: Context) -> None:
    run_algorithm(ctx, PPO)
