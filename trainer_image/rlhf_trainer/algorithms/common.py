"""What every actor loop shares: the algorithm base (model, tokenizer, DeepSpeed strategy), the step
driver (data, resume, checkpoints, metrics, export) and the rollout helpers of the online algorithms
(generate, score, micro-batches).

An algorithm is an ActorAlgorithm with `step(records, timings) -> dict of metrics`, and `state_dict()` /
`load_state_dict()` for what it must carry over a restart (e.g. the KL controller). Its module's
`run(ctx)` is `run_algorithm(ctx, TheClass)`; rlhf_contract.algorithms names the module.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rlhf_contract.algorithms import ALGORITHMS

from rlhf_trainer import checkpoint, distributed, models, samples
from rlhf_trainer.data import (
    Sampler,
    encode_prompt_responses,
    encode_prompts,
    load_dataset,
    position_ids_from_mask,
    response_mask,
    shard,
)
from rlhf_trainer.experience import Experience
from rlhf_trainer.losses.utils import logprobs_from_logits
from rlhf_trainer.runtime import Context, log, resume_step
from rlhf_trainer.strategy import DeepSpeedStrategy

# Keys of a step's stats that are means over the actor ranks' shares (the rest are rank 0's).
AVERAGED = ("reward_mean", "reward_std", "kl", "policy_loss", "value_loss", "loss", "clip_fraction", "entropy",
            "response_length", "preference_accuracy")


class ActorAlgorithm:
    """The actor's trained model behind a DeepSpeed strategy, its tokenizer, and the hyperparameters.

    load_model: models.load_policy (a causal LM) or models.load_reward_model (rm);
    rows_per_prompt: rows a prompt becomes in a step (grpo/rloo: group_size samples);
    rows_per_sample: rows one micro-batch sample takes (2 for a pair: chosen and rejected).
    """

    def __init__(self, ctx: Context, *, load_model=models.load_policy, rows_per_prompt: int = 1,
                 rows_per_sample: int = 1):
        hp = self.hp = ctx.hp
        self.ctx = ctx
        self.tokenizer = models.load_tokenizer(ctx.cfg.model.path)
        self.strategy = DeepSpeedStrategy(
            load_model(ctx.cfg.model.path, seed=hp.seed), ctx.cfg.roles["actor"].deepspeed,
            learning_rate=hp.learning_rate, micro_batch_size=rows_per_sample * hp.micro_batch_size,
            grad_accum=ctx.grad_accum(ctx.rows_per_rank(rows_per_prompt)),
        )

    def step(self, records: list, timings: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the algorithm carries over a restart besides the model (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def run_algorithm(ctx: Context, algorithm: type[ActorAlgorithm], *args: Any) -> None:
    """An actor loop from start to export: data first (bad data fails fast), colocated roles, then drive()."""
    records = load_records(ctx)
    start_colocated(ctx)
    drive(ctx, algorithm(ctx, *args), records)


def micro_batches(size: int, micro_batch_size: int) -> Iterator[slice]:
    for start in range(0, size, micro_batch_size):
        yield slice(start, min(start + micro_batch_size, size))


def global_normaliser(local_count: float) -> float:
    """Tokens (or rows) of the whole actor batch divided by the world size.

    DeepSpeed averages gradients over data-parallel ranks, so a rank whose loss is its own sum over
    this normaliser ends with the gradient of the sum over the whole batch divided by its size.
    """
    return max(distributed.all_reduce_sum(local_count) / distributed.world_size(), 1e-8)


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    world = distributed.world_size()
    if world == 1:
        return stats
    return {k: (distributed.all_reduce_sum(v) / world if k in AVERAGED else v) for k, v in stats.items()}


@dataclass
class Rollout:
    """Sampled responses of one actor rank (B rows, P prompt columns, R response columns), on CPU."""

    sequences: torch.Tensor  # (B, P + R) left-padded prompt + response (+ padding after EOS)
    attention_mask: torch.Tensor  # (B, P + R) 1 on real prompt and response tokens
    action_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    prompts: list[str]
    responses: list[str]  # decoded, special tokens dropped


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], hp, *, greedy: bool = False) -> Rollout:
    """Sample (or, `greedy`, take the most likely) up to max_new_tokens per prompt."""
    enc = encode_prompts(tokenizer, prompts, hp.max_prompt_length)
    dev = distributed.device()
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": hp.temperature,
                                                    "top_k": 0, "top_p": 1.0}
    out = model.generate(
        input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev), **sampling,
        max_new_tokens=hp.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ).cpu()
    response_ids = out[:, enc["input_ids"].shape[1]:]
    mask, ended = response_mask(response_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([enc["attention_mask"], mask], dim=1)
    responses = tokenizer.batch_decode(response_ids.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollout(out, attention_mask, mask, ~ended, list(prompts), responses)


def response_logprobs(model, sequences, attention_mask, response_length: int, temperature: float):
    """(B, R) log-probs of the response tokens (the last R columns) and their (B, R, V) logits.

    Logits are divided by the sampling temperature: the probabilities the tokens were sampled with.
    """
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, use_cache=False,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits[:, -response_length - 1:-1].float() / temperature
    return logprobs_from_logits(logits, sequences[:, -response_length:]), logits


@torch.no_grad()
def collect_experience(policy, roll: Rollout, answers, hp, *, reference, score, critic=None,
                       old_logprobs: bool = True) -> Experience:
    """A rollout's Experience: the policy's own log-probs here, the other roles' answers over their clients.

    old_logprobs=False leaves them None: the loop takes them from its first training forward.
    """
    dev, R = distributed.device(), roll.action_mask.shape[1]
    seqs = {"input_ids": roll.sequences, "attention_mask": roll.attention_mask}
    old = None
    if old_logprobs:
        old, _ = response_logprobs(policy, roll.sequences.to(dev), roll.attention_mask.to(dev), R, hp.temperature)
    return Experience(
        sequences=roll.sequences, attention_mask=roll.attention_mask,
        position_ids=position_ids_from_mask(roll.attention_mask), action_mask=roll.action_mask,
        old_logprobs=old, truncated=roll.truncated,
        ref_logprobs=reference.call("logprobs", seqs, response_length=R)[0]["logprobs"],
        values=None if critic is None else critic.call("values", seqs, response_length=R)[0]["values"],
        scores=score(roll.prompts, roll.responses, answers),
    )


class Scorer:
    """Scores responses with the rule reward in-process, or with the reward role's model."""

    def __init__(self, ctx: Context):
        self.rule = None
        self.client = None
        if ctx.cfg.reward.type == "rule":
            from rlhf_trainer.rewards import build_reward_fn, describe_reward

            self.rule = build_reward_fn(ctx.cfg.reward)
            self.source = describe_reward(ctx.cfg.reward)
        else:
            self.client = ctx.client("reward")
            self.source = f"the reward model {ctx.cfg.reward_model.path}"

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str | None]) -> torch.Tensor:
        if self.rule is not None:
            return torch.tensor(self.rule(prompts, responses, answers), dtype=torch.float32)
        return self.client.call("score", prompts=prompts, responses=responses)[0]["scores"].float()


def on_actions(values: torch.Tensor | None, action_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, R) values with the positions outside the response (padding after EOS) set to 0."""
    return None if values is None else torch.where(action_mask.bool(), values, torch.zeros_like(values))


def rollout_ok(ctx: Context, exp: Experience, roll: Rollout, records, source: str) -> bool:
    """The non-finite checks of a scored rollout, on every actor rank (finite.py): the scores
    first, then what the actor, reference and critic computed. False: skip the batch."""
    guard = ctx.guard
    if not guard.batch_ok("reward", {"scores": exp.scores}, records, source=source, responses=roll.responses):
        return False
    tensors = {"ref_logprobs": on_actions(exp.ref_logprobs, exp.action_mask),
               "old_logprobs": on_actions(exp.old_logprobs, exp.action_mask),
               "values": on_actions(exp.values, exp.action_mask)}
    return guard.batch_ok("experience", tensors, records, source="the reference / actor / critic forward",
                          responses=roll.responses)


def write_samples(ctx: Context, roll: Rollout, exp: Experience) -> None:
    """When due (hyperparameters.sample_interval_steps), the first samples_per_step rollouts of this rank
    with their score, summed KL (exp.kl, per token) and length go to samples/ (rlhf_trainer.samples)."""
    hp, step = ctx.hp, ctx.guard.step
    if not samples.due(step, hp.sample_interval_steps):
        return
    kl = None if exp.kl is None else exp.kl.detach().float().cpu()
    ctx.metrics.record_samples(samples.pick(step, roll.prompts, roll.responses, exp.scores.cpu(), kl,
                                            exp.action_mask.cpu(), exp.truncated.cpu(), hp.samples_per_step))


def skipped_rollout_stats(exp: Experience) -> dict[str, float]:
    """A skipped rollout's step stats: what was sampled, no loss (finite scores' mean only)."""
    finite = exp.scores[torch.isfinite(exp.scores)]
    return {"reward_mean": float(finite.mean()) if len(finite) else float("nan"),
            "response_length": float(exp.action_mask.float().sum(-1).mean()), "tokens": 0.0}


def encode_pairs(tokenizer, records, hp) -> dict[str, torch.Tensor]:
    """Preference pairs -> one right-padded (2B, T) batch: rows 0..B-1 chosen, B..2B-1 rejected."""
    prompts = [r.prompt for r in records]
    lengths = {"max_prompt_length": hp.max_prompt_length, "max_response_length": hp.max_new_tokens + 1}
    chosen = encode_prompt_responses(tokenizer, prompts, [r.chosen for r in records], **lengths)
    rejected = encode_prompt_responses(tokenizer, prompts, [r.rejected for r in records], **lengths)
    width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    pad = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "loss_mask": 0}
    return {
        key: torch.cat([torch.nn.functional.pad(part[key], (0, width - part[key].shape[1]), value=value)
                        for part in (chosen, rejected)])
        for key, value in pad.items()
    }


def pair_slices(num_pairs: int, micro_batch_size: int) -> Iterator[torch.Tensor]:
    """Row indices of each micro-batch of pairs in an encode_pairs batch (chosen rows, then rejected)."""
    for mb in micro_batches(num_pairs, micro_batch_size):
        rows = torch.arange(mb.start, mb.stop)
        yield torch.cat([rows, rows + num_pairs])


def start_colocated(ctx: Context) -> None:
    """Build the services of roles colocated in the actor's processes (RLHF_COLOCATED_ROLES)."""
    from rlhf_trainer.runtime import build_service

    for role in ctx.env.colocated_roles:
        ctx.local_services[role] = build_service(ctx, role)


def load_records(ctx: Context):
    """The training records, read before any model is built so bad data fails fast (exit 65).

    The held-out records of dataset.eval_path (same format) are read too, into ctx.eval_records.
    """
    kind = ALGORITHMS[ctx.cfg.algorithm].data
    if ctx.cfg.dataset.eval_path:
        ctx.eval_records = load_dataset(ctx.cfg.dataset.eval_path, ctx.cfg.dataset.format, kind=kind)
    return load_dataset(ctx.cfg.dataset.path, ctx.cfg.dataset.format, kind=kind)


def _savers(ctx: Context, strategy) -> dict[str, checkpoint.RoleCheckpointer]:
    root = ctx.env.checkpoint_dir
    out = {"actor": checkpoint.RoleCheckpointer(root, "actor", strategy)}
    for role in ctx.env.colocated_roles:
        out[role] = checkpoint.RoleCheckpointer(root, role, ctx.strategies.get(role))
    return out


def save_step(ctx: Context, step: int, savers, actor_state: dict[str, Any]) -> None:
    """Every role saves `step`; actor rank 0 then marks it COMPLETE and prunes old steps."""
    root = ctx.env.checkpoint_dir
    if distributed.world_rank() == 0:
        checkpoint.unmark_complete(root, step)
    distributed.role_barrier()
    # Wait for each reply before any collective of the actor's world: a server answering actor
    # ranks in turn could otherwise block on a rank that waits in a barrier for this one.
    for dst in ctx.remote_hosts():
        ctx.bridge.send(dst, "save", step=step)
        ctx.bridge.recv(dst)  # "ok": that process has saved its roles
    for role, saver in savers.items():
        saver.save(step, actor_state if role == "actor" else {})
    distributed.role_barrier()  # every actor rank has heard from its servers
    if distributed.world_rank() == 0:
        checkpoint.mark_complete(root, step, sorted(ctx.cfg.roles))
        checkpoint.prune(root, ctx.cfg.checkpoint.keep)
    ctx.metrics.set_checkpoint_step(step)
    log(f"checkpoint step-{step} complete")


def export(ctx: Context, strategy, tokenizer) -> Path:
    """The final model as a Hugging Face folder at $RLHF_CHECKPOINT_DIR/export (rank 0 writes)."""
    state = strategy.full_state_dict()  # collective under ZeRO-3
    final = Path(ctx.env.checkpoint_dir) / "export"
    if distributed.world_rank() == 0:
        tmp = final.with_name(".export.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        models.save_pretrained(strategy.module, tokenizer, tmp, state_dict=state)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    distributed.role_barrier()
    return final


def run_eval(ctx: Context, algorithm) -> dict[str, float]:
    """The held-out metrics (algorithms/evaluation.py), timed as the `eval` phase."""
    from rlhf_trainer.algorithms.evaluation import evaluate

    with ctx.metrics.phase("eval"):
        return evaluate(ctx, algorithm, ctx.eval_records)


def drive(ctx: Context, algorithm, records) -> None:
    """Run `algorithm` on `records` from the newest complete checkpoint (or step 0) to max_steps, then export."""
    hp = ctx.hp
    sampler = Sampler(len(records), hp.batch_size, seed=hp.seed)
    savers = _savers(ctx, algorithm.strategy)
    start = resume_step(ctx) or 0
    if start:
        for role, saver in savers.items():
            state = saver.load(start)
            if role == "actor":
                sampler.load_state_dict(state["data"])
                algorithm.load_state_dict(state["algorithm"])
        ctx.metrics.set_checkpoint_step(start)
        ctx.metrics.gauges["step"].set(start)
        log(f"actor-{ctx.env.rank}: resumed from step {start}")
    ranks = ctx.cfg.roles["actor"].replicas
    if start == 0 and ctx.eval_records:
        ctx.metrics.record_step(0, run_eval(ctx, algorithm))  # the initial policy, for comparison
    for step in range(start + 1, hp.max_steps + 1):
        batch = [records[i] for i in shard(sampler.next_batch(), ctx.env.rank, ranks)]
        timings: dict[str, float] = {}
        ctx.guard.step = step
        skipped_before = sum(ctx.guard.skipped.values())
        t0 = time.perf_counter()
        stats = algorithm.step(batch, timings)
        elapsed = time.perf_counter() - t0
        stats = mean_over_ranks(stats)
        tokens = distributed.all_reduce_sum(stats.pop("tokens", 0.0))
        stats.update(timings, tokens_per_second=tokens / elapsed, step_seconds=elapsed)
        if ctx.guard.policy == "skip":
            stats["non_finite_skipped"] = float(sum(ctx.guard.skipped.values()) - skipped_before)
        checkpoint_now = step % ctx.cfg.checkpoint.interval_steps == 0 or step == hp.max_steps
        if checkpoint_now and ctx.eval_records:
            stats.update(run_eval(ctx, algorithm))
        ctx.metrics.record_step(step, stats)
        if ctx.env.rank == 0:
            log(f"step {step}/{hp.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in stats.items() if v is not None))
        if checkpoint_now:
            with ctx.metrics.phase("sync"):
                save_step(ctx, step, savers, {"data": sampler.state_dict(), "algorithm": algorithm.state_dict()})
    ctx.guard.check_updated("actor", hp.max_steps - start)
    export(ctx, algorithm.strategy, algorithm.tokenizer)
    for dst in ctx.remote_hosts():
        ctx.bridge.send(dst, "stop")
        ctx.bridge.recv(dst)
    log(f"actor-{ctx.env.rank}: done")
