"""PPO (Schulman et al. 2017) for language models, as in Ziegler et al. 2019 / Ouyang et al. 2022.

One step: rollout (sample responses) -> score (actor and reference log-probs, critic values,
reward) -> advantages (per-token KL penalty + score on the last token, GAE) -> update (clipped
policy loss here, clipped value loss on the critic role), `ppo_epochs` times over the batch. A critic
in its own pods trains each epoch while the actor trains the policy's (roles.RemoteClient.submit).

With `reward.type: prm` a process reward model scores every step and its scores join the per-token
rewards at the tokens ending the steps (losses.prm, "DenseReward"), next to the rule's outcome
score on the last token; `critic.model: reward` starts the critic from the PRM (ValueInit, models.load_value_model).

With `hyperparameters.turns` > 1 a rollout is a conversation (rlhf_trainer.multiturn): every policy
turn's score lands on its last token, the environment's tokens are no actions (GAE passes over them),
and `selfCorrection: score` shapes the two attempts' rewards and KL weights (rlhf_trainer.self_correction).

PPO-ptx (Ouyang et al. 2022, eq. 2): with `dataset.pretrain_path`, every actor micro-batch also
takes a micro-batch of pretraining text and adds `ptx_coef` times its language-modelling loss
(losses.ptx) to the policy loss before the one backward pass.

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
    global_normaliser,
    rollout_ok,
    run_algorithm,
    skipped_rollout_stats,
    watch_rollout,
    write_samples,
)
from rlhf_trainer.data import Sampler, encode_texts, load_texts, position_ids_from_mask, shard
from rlhf_trainer.forward import token_logprobs
from rlhf_trainer.losses.gae import gae_advantages, token_rewards
from rlhf_trainer.losses.kl import build_kl_controller, kl_estimate
from rlhf_trainer.losses.ppo import entropy_bonus, policy_loss
from rlhf_trainer.losses.ptx import lm_labels, ptx_loss
from rlhf_trainer.losses.sft import count_loss_tokens
from rlhf_trainer.losses.turns import per_turn_gae, turn_coefficients, turn_token_rewards
from rlhf_trainer.losses.utils import global_mean, masked_whiten
from rlhf_trainer.multiturn import environment_of, rollout, turn_stats
from rlhf_trainer.runtime import Context
from rlhf_trainer.self_correction import turn_plan


class PPO(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer):
        super().__init__(ctx, renderer)
        hp = self.hp
        self.reference, self.critic = ctx.client("reference"), ctx.client("critic")
        self.score = Scorer(ctx, self.tokenizer)
        self.environment = environment_of(hp)
        self.kl_ctl = build_kl_controller(hp.kl_coef, hp.kl_target, hp.kl_horizon)
        self.ptx_texts = load_texts(ctx.cfg.dataset.pretrain_path) if ctx.cfg.dataset.pretrain_path else None
        # Its own sampler (and seed), saved with the checkpoint like the prompts' position.
        self.ptx_sampler = Sampler(len(self.ptx_texts), hp.batch_size, seed=hp.seed + 1) if self.ptx_texts else None

    def state_dict(self):
        state = {"kl_ctl": self.kl_ctl.state_dict()}
        if self.ptx_sampler is not None:
            state["ptx_data"] = self.ptx_sampler.state_dict()
        return state

    def load_state_dict(self, state):
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.ptx_sampler is not None:
            self.ptx_sampler.load_state_dict(state["ptx_data"])

    def ptx_batch(self) -> dict[str, torch.Tensor] | None:
        """This rank's share of the step's pretraining rows (input_ids, attention_mask, labels), or None."""
        if self.ptx_sampler is None:
            return None
        hp, ranks = self.hp, self.ctx.placements["actor"].ranks
        texts = [self.ptx_texts[i] for i in shard(self.ptx_sampler.next_batch(), self.ctx.env.rank, ranks)]
        batch = encode_texts(self.tokenizer, texts, hp.max_prompt_length + hp.max_new_tokens)
        batch["labels"] = lm_labels(batch["input_ids"], batch["attention_mask"])
        return {k: v.to(distributed.device()) for k, v in batch.items()}

    def ptx_term(self, ptx, rows: slice, num_tokens: float) -> torch.Tensor:
        """ptx_coef * the LM loss of pretraining rows `rows`, per token of the global ptx batch."""
        mask = ptx["attention_mask"][rows]
        logits = self.strategy.forward(input_ids=ptx["input_ids"][rows], attention_mask=mask,
                                       position_ids=position_ids_from_mask(mask), use_cache=False).logits
        return ptx_loss(logits, ptx["labels"][rows], coef=self.hp.ptx_coef, num_tokens=num_tokens)

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics, dev = self.hp, self.ctx.metrics, distributed.device()
        # 1. rollout
        with metrics.phase("generate", timings):
            self.strategy.eval()
            roll = rollout(self.strategy.module, self.renderer, records, hp, self.environment,
                           synced_gpus=self.strategy.synced_generation)
        # 2. score: old policy, reference, critic, reward
        with metrics.phase("score", timings), torch.no_grad():
            exp = collect_experience(self.strategy.module, roll, [r.answer for r in records], hp,
                                     reference=self.reference, score=self.score, critic=self.critic).to(dev)
        if not rollout_ok(self.ctx, exp, roll, records, self.score.source):
            return skipped_rollout_stats(exp)
        # 3. advantages
        mask = exp.action_mask.float()
        exp.kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, hp.kl_estimator) * mask
        stage = None
        if exp.turn_ids is None:
            exp.rewards = token_rewards(exp.kl, exp.scores, mask, kl_coef=self.kl_ctl.value, reward_clip=hp.reward_clip,
                                        ended=~exp.truncated, truncation_penalty=hp.truncation_penalty)
        else:  # each turn's reward on its last token, per-turn KL weights (losses.turns; SCoRe's shaping)
            plan = turn_plan(exp.turn_scores, step=self.ctx.guard.step, hp=hp, kl_coef=self.kl_ctl.value)
            exp.turn_rewards, exp.own_turn_credit, stage = plan.rewards, plan.own_turn_credit, plan.stage
            exp.kl_coefs = turn_coefficients(plan.kl_coefs, exp.turn_ids)
            exp.rewards = turn_token_rewards(exp.kl, exp.turn_rewards, exp.turn_ids, kl_coefs=exp.kl_coefs,
                                             reward_clip=hp.reward_clip, truncated=exp.turn_truncated,
                                             truncation_penalty=hp.truncation_penalty)
        if exp.step_rewards is not None:  # a process reward model's dense rewards (DenseReward)
            exp.rewards = exp.rewards + exp.step_rewards * mask
        if exp.own_turn_credit:  # SCoRe: every attempt its own episode
            exp.advantages, exp.returns = per_turn_gae(exp.rewards, exp.values, exp.turn_ids, exp.turn_rewards.shape[1],
                                                       gamma=hp.gamma, lam=hp.lam)
        else:
            exp.advantages, exp.returns = gae_advantages(exp.rewards, exp.values, mask, gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages:
            exp.advantages = masked_whiten(exp.advantages, mask, reduce=distributed.all_reduce_tensor)
        write_samples(self.ctx, roll, exp)
        # 4. update: the policy (+ the pretraining term) here, the critic on its role
        num_tokens = global_normaliser(exp.num_tokens)
        ptx = self.ptx_batch()
        ptx_tokens = global_normaliser(float(count_loss_tokens(ptx["labels"]))) if ptx else 0.0
        ptx_total = 0.0
        with metrics.phase("train", timings):
            self.strategy.train()
            for _ in range(hp.ppo_epochs):
                # The critic's epoch on its own role runs while the policy's runs here (it needs only the
                # returns); a colocated critic trains when its result is read, after the policy.
                critic_epoch = self.critic.submit("train", {
                    "input_ids": exp.sequences, "attention_mask": exp.attention_mask, "old_values": exp.values,
                    "returns": exp.returns, "action_mask": exp.action_mask,
                }, step=self.ctx.guard.step)
                stats = []
                for i, mb in enumerate(exp.split(hp.micro_batch_size)):
                    logprobs, logits = token_logprobs(self.strategy.forward, mb.sequences, mb.attention_mask,
                                                      temperature=hp.temperature, response_length=mb.action_mask.shape[1],
                                                      padding_free=hp.padding_free)
                    loss, clip_fraction = policy_loss(
                        logprobs, mb.old_logprobs, mb.advantages, mb.action_mask,
                        clip_range=hp.clip_range, clip_range_high=hp.clip_range_high or None,
                        dual_clip=hp.dual_clip, num_tokens=num_tokens,
                    )
                    bonus, entropy = entropy_bonus(logits, mb.action_mask, coef=hp.entropy_coef, num_tokens=num_tokens,
                                                   temperature=hp.temperature)
                    loss = loss + bonus
                    policy_value = float(loss.detach())
                    source = "ppo policy loss"
                    if ptx is not None:
                        term = self.ptx_term(ptx, slice(i * hp.micro_batch_size, (i + 1) * hp.micro_batch_size),
                                             ptx_tokens)
                        ptx_total += term.item()
                        loss = loss + term
                        source = "ppo policy loss + pretraining (ptx) loss"
                    value = self.ctx.guard.backward_step(self.strategy, loss, anchor=logprobs, role="actor",
                                                         source=source)
                    stats.append((policy_value if value is not None else 0.0, clip_fraction.item(), entropy.item()))
                value_loss = critic_epoch.result()[1]["value_loss"]
        # The controller steers every rank's loss: feed it the whole batch's mean KL and size.
        mean_kl = global_mean(exp.kl.sum(-1), reduce=distributed.all_reduce_tensor)
        self.kl_ctl.update(mean_kl, hp.batch_size)
        policy = sum(s[0] for s in stats)
        return {
            **watch_rollout(self.ctx, exp),
            "reward_mean": float(exp.scores.mean()), "reward_std": float(exp.scores.std()) if len(records) > 1 else 0.0,
            "kl": mean_kl, "kl_coef": self.kl_ctl.value, "policy_loss": policy, "value_loss": value_loss,
            "loss": policy + hp.vf_coef * value_loss, "clip_fraction": sum(s[1] for s in stats) / len(stats),
            "entropy": sum(s[2] for s in stats) / len(stats), "response_length": float(mask.sum(-1).mean()),
            "tokens": float(exp.attention_mask.sum()),
            **({"ptx_loss": ptx_total / hp.ppo_epochs} if ptx is not None else {}),
            **({"process_reward": float(exp.step_rewards.sum(-1).mean())} if exp.step_rewards is not None else {}),
            **turn_stats(exp, stage),
        }


def run(ctx: Context) -> None:
    run_algorithm(ctx, PPO)
