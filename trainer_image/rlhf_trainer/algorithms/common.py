"""What every actor loop shares: the algorithm base (model, tokenizer, DeepSpeed strategy), the step
driver (data, resume, checkpoints, metrics, export) and the rollout helpers of the online algorithms
(generate, score, micro-batches).

An algorithm is an ActorAlgorithm with `step(records, timings) -> dict of metrics`, and `state_dict()` /
`load_state_dict()` for what it must carry over a restart (e.g. the KL controller). Its module's
`run(ctx)` is `run_algorithm(ctx, TheClass)`; rlhf_contract.algorithms names the module. One that
trains no model (strategy None, e.g. prm-label) has an `export(ctx)` that writes its own result
instead of a model folder.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rlhf_contract import wire
from rlhf_contract.algorithms import ALGORITHMS
from transformers import LogitsProcessorList

from rlhf_trainer import alarms as alarm_signals
from rlhf_trainer import checkpoint, distributed, models, quantization, samples, stopping
from rlhf_trainer.chat import Renderer
from rlhf_trainer.data import (
    Sampler,
    load_dataset,
    pad_left,
    pad_right,
    position_ids_from_mask,
    response_mask,
    shard,
)
from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.experience import Experience
from rlhf_trainer.forward import chunked_token_logprobs, row_slices, shared_prompt_cache
from rlhf_trainer.records import Prompt
from rlhf_trainer.runtime import Context, log, resume_step
from rlhf_trainer.sampling import SampledLogProbs, only_these_settings, sampling_config, stop_token_ids
from rlhf_trainer.stopping import Stopped
from rlhf_trainer.strategy import DeepSpeedStrategy
from rlhf_trainer.tokenized import PairRow, PromptRow, Row, tokenize_records, truncation_error

# Keys of a step's stats that are means over the actor ranks' shares (the rest are rank 0's).
AVERAGED = ("reward_mean", "reward_std", "kl", "policy_loss", "value_loss", "loss", "clip_fraction", "entropy",
            "response_length", "preference_accuracy", "ptx_loss", "process_reward",
            # multi-turn rollouts (multiturn.turn_stats), besides each turn's reward_t<k>
            "accuracy_t1", "accuracy_t2", "accuracy_delta", "wrong_to_right", "right_to_wrong")
# Prefix of the per-turn mean scores (reward_t1, reward_t2, ...), averaged over ranks too.
TURN_REWARD = "reward_t"
# Keys of a step's stats that are sums over the actor ranks.
SUMMED = ("tokens", "truncated_rows")


class ActorAlgorithm:
    """The actor's trained model behind a DeepSpeed strategy, its tokenizer, and the hyperparameters.

    renderer: how prompts and responses become the model's tokens (text_pipeline; its stop_ids end
    sampled responses);
    load_model: models.load_policy (a causal LM) or models.load_reward_model (rm);
    rows_per_prompt: rows a prompt becomes in a step (grpo/rloo: group_size samples);
    rows_per_sample: rows one micro-batch sample takes (2 for a pair: chosen and rejected).
    With roles.actor.lora.rank > 0 the model trains LoRA adapters (rlhf_trainer.lora). The roles
    colocated in this process start once the model exists: a reference can then share a LoRA
    actor's base weights.
    """

    def __init__(self, ctx: Context, renderer: Renderer, *, load_model=models.load_policy, rows_per_prompt: int = 1,
                 rows_per_sample: int = 1):
        hp = self.hp = ctx.hp
        self.ctx = ctx
        self.renderer, self.tokenizer, self.stop_ids = renderer, renderer.tokenizer, renderer.stop_ids
        self.classifier = load_model is models.load_reward_model
        # The unquantized base: the model itself, or the base the merged export folds the adapters into.
        self.load_base = lambda: load_model(ctx.cfg.model.path, seed=hp.seed)
        adapters, settings = ctx.cfg.roles["actor"].lora, ctx.cfg.roles["actor"].deepspeed
        bnb = quantization.for_this_process(ctx.cfg.roles["actor"])
        if bnb is None:
            model = self.load_base()
        else:
            log(f"actor: the base loaded {adapters.quantization} by bitsandbytes ({bnb})")
            model = quantization.load_quantized(functools.partial(load_model, ctx.cfg.model.path, seed=hp.seed), bnb,
                                                distributed.device(), gradient_checkpointing=settings.gradient_checkpointing)
        if adapters.rank:
            from rlhf_trainer import lora

            model = lora.with_lora(model, adapters, classifier=self.classifier)
        self.strategy = DeepSpeedStrategy(
            model, ctx.cfg.roles["actor"].deepspeed,
            learning_rate=hp.learning_rate, micro_batch_size=rows_per_sample * hp.micro_batch_size,
            grad_accum=ctx.grad_accum(ctx.rows_per_rank(rows_per_prompt)),
        )
        ctx.actor_model = self.strategy.module
        start_colocated(ctx)

    def step(self, records: list, timings: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the algorithm carries over a restart besides the model (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def run_algorithm(ctx: Context, algorithm: type[ActorAlgorithm], *args: Any) -> None:
    """An actor loop from start to export: tokenizer and data first (bad data and lengths fail fast),
    colocated roles, then drive()."""
    renderer = text_pipeline(ctx)
    rows = load_rows(ctx, renderer)
    drive(ctx, algorithm(ctx, renderer, *args), rows)


def micro_batches(size: int, micro_batch_size: int) -> Iterator[slice]:
    yield from row_slices(size, micro_batch_size)


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
    return {k: (distributed.all_reduce_sum(v) / world if k in AVERAGED or k.startswith(TURN_REWARD) else v)
            for k, v in stats.items()}


@dataclass
class Rollout:
    """Sampled responses of one actor rank (B rows, P prompt columns, R response columns), on CPU."""

    sequences: torch.Tensor  # (B, P + R) left-padded prompt + response (+ padding after EOS)
    attention_mask: torch.Tensor  # (B, P + R) 1 on real prompt and response tokens
    action_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first stop token
    truncated: torch.Tensor  # (B,) bool: no stop token within max_new_tokens
    prompts: list[Prompt]  # as in the dataset (text or messages), for the rewards
    responses: list[str]  # decoded, special tokens dropped (multi-turn: every turn after the prompt)
    # Multi-turn rollouts only (hyperparameters.turns > 1, rlhf_trainer.multiturn), else None; K turns:
    turn_ids: torch.Tensor | None = None  # (B, R) long: the policy turn 0..K-1 of each action token, -1 elsewhere
    turn_truncated: torch.Tensor | None = None  # (B, K) bool: turn k sampled no stop token
    turn_responses: list[list[str]] | None = None  # B x K: each policy turn's text
    turn_prompts: list[list[Prompt]] | None = None  # B x K: what turn k answers (the conversation before it)
    # (B, R) float32: each response token's log-prob when it was sampled (hyperparameters.oldLogProbs
    # sampling; 0 on tokens the policy did not sample), else None
    sampled_logprobs: torch.Tensor | None = None


@torch.no_grad()
def generate(model, tokenizer, rows: list[PromptRow], hp, stop_ids, *, synced_gpus: bool = False,
             greedy: bool = False) -> Rollout:
    """Sample one response per prompt row, at hp.temperature only (rlhf_trainer.sampling), each ending
    at the first of `stop_ids` or after hp.max_new_tokens; `hp.inference_chunk_size` rows per call.
    `greedy` takes the most likely token instead (the held-out evaluation).

    Chunks bound the memory of the KV cache and logits; their responses are right-padded to the
    longest. `synced_gpus` keeps every rank of the world stepping until all ranks are done
    (transformers' flag; needed under ZeRO-3, where each step gathers parameters collectively and
    a rank that stopped early would leave the others waiting forever). Every rank must then make
    the same number of calls: the same number of prompts per rank.
    """
    enc, response_ids, mask, ended, logprobs = sample(model, tokenizer, [r.ids for r in rows], hp, stop_ids,
                                                      synced_gpus=synced_gpus, greedy=greedy,
                                                      logprobs=records_logprobs(hp, greedy))
    sequences = torch.cat([enc["input_ids"], response_ids], dim=1)
    attention_mask = torch.cat([enc["attention_mask"], mask], dim=1)
    responses = tokenizer.batch_decode(response_ids.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollout(sequences, attention_mask, mask, ~ended, [r.prompt for r in rows], responses,
                   sampled_logprobs=None if logprobs is None else logprobs * mask)


def records_logprobs(hp, greedy: bool) -> bool:
    """Whether sampling keeps each token's log-prob: hyperparameters.oldLogProbs sampling, not greedy."""
    return hp.old_log_probs == "sampling" and not greedy


@torch.no_grad()
def sample(model, tokenizer, id_rows: list[list[int]], hp, stop_ids, *, synced_gpus: bool = False,
           greedy: bool = False, logprobs: bool = False
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """generate()'s sampling: token rows -> (their left-padded batch (B, P), response ids (B, R),
    response mask (B, R), ended (B,) bool, and with `logprobs` each response token's float32 log-prob
    under the distribution it was drawn from (B, R) (sampling.SampledLogProbs), else None), on CPU."""
    enc = pad_left(id_rows, tokenizer.pad_token_id)
    dev = distributed.device()
    config = sampling_config(temperature=1.0 if greedy else hp.temperature, max_new_tokens=hp.max_new_tokens,
                             stop_ids=stop_ids, pad_token_id=tokenizer.pad_token_id)
    if greedy:
        config.do_sample = False
    slices = row_slices(len(id_rows), hp.inference_chunk_size)
    order = length_grouped_order([len(r) for r in id_rows]) if len(slices) > 1 else list(range(len(id_rows)))
    pieces, logprob_pieces = [], []
    with only_these_settings(model):
        for s in slices:
            recorder = SampledLogProbs(hp.temperature) if logprobs else None
            # Each chunk padded to its own longest prompt: no prefill or cached key over another chunk's padding.
            chunk = pad_left([id_rows[i] for i in order[s]], tokenizer.pad_token_id)
            ids, attention, width = chunk["input_ids"].to(dev), chunk["attention_mask"].to(dev), chunk["input_ids"].shape[1]
            # prefixSharing: a GRPO group's samples share one prefill of their prompt
            cache = shared_prompt_cache(model, ids, attention) if hp.prefix_sharing else None
            out = model.generate(input_ids=ids, attention_mask=attention, past_key_values=cache,
                                 generation_config=config, synced_gpus=synced_gpus,
                                 logits_processor=LogitsProcessorList([recorder] if recorder else []))
            pieces.append(out[:, width:].cpu())
            if recorder is not None:
                logprob_pieces.append(recorder.finish(out[:, width:]).cpu())
    longest = max(p.shape[1] for p in pieces)

    def joined(chunks: list[torch.Tensor], value) -> torch.Tensor:
        # A chunk whose rows all ended early is shorter: its padding comes after every row's stop token.
        return torch.cat([torch.nn.functional.pad(p, (0, longest - p.shape[1]), value=value) for p in chunks])

    back = torch.argsort(torch.tensor(order))  # the chunks' rows -> the callers' order
    response_ids = joined(pieces, tokenizer.pad_token_id)[back]
    mask, ended = response_mask(response_ids, stop_ids)
    return enc, response_ids, mask, ended, joined(logprob_pieces, 0.0)[back] if logprobs else None


def length_grouped_order(lengths: list[int]) -> list[int]:
    """Row indices by prompt length, shortest first; rows of one length keep their order (a GRPO group's
    copies of a prompt stay side by side for prefixSharing). Cut into chunks in this order, each chunk
    holds prompts of like length and is left-padded to its own longest, not the batch's."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


@torch.no_grad()
def collect_experience(policy, roll: Rollout, answers, hp, *, reference, score, critic=None,
                       old_logprobs: bool = True) -> Experience:
    """A rollout's Experience: the policy's own log-probs here, the other roles' answers over their clients.

    old_logprobs=False leaves them None: the loop takes them from its first training forward; a rollout
    that kept its sampling log-probs (hyperparameters.oldLogProbs sampling) gives them without a forward.
    """
    dev, R = distributed.device(), roll.action_mask.shape[1]
    seqs = {"input_ids": roll.sequences, "attention_mask": roll.attention_mask}
    old = roll.sampled_logprobs if old_logprobs else None
    if old_logprobs and old is None:
        old = chunked_token_logprobs(policy, roll.sequences.to(dev), roll.attention_mask.to(dev),
                                     chunk_size=hp.inference_chunk_size, temperature=hp.temperature, response_length=R,
                                     padding_free=hp.padding_free, prefix_sharing=hp.prefix_sharing)
    ref = reference.call("logprobs", seqs, response_length=R, prefix_sharing=hp.prefix_sharing)[0]["logprobs"]
    values = None if critic is None else critic.call("values", seqs, response_length=R)[0]["values"]
    turn_scores = None
    if roll.turn_ids is None:
        scores = score(roll.prompts, roll.responses, answers)
    else:  # every policy turn scored against the conversation before it (rlhf_trainer.multiturn)
        turns = roll.turn_truncated.shape[1]
        turn_scores = torch.stack([score([p[k] for p in roll.turn_prompts], [t[k] for t in roll.turn_responses],
                                         answers) for k in range(turns)], dim=1)
        scores = turn_scores[:, -1]
    return Experience(
        sequences=roll.sequences, attention_mask=roll.attention_mask,
        position_ids=position_ids_from_mask(roll.attention_mask), action_mask=roll.action_mask,
        old_logprobs=old, truncated=roll.truncated, ref_logprobs=ref, values=values,
        scores=scores, step_rewards=score.step_rewards(roll),
        turn_ids=roll.turn_ids, turn_scores=turn_scores, turn_truncated=roll.turn_truncated,
    )


class Scorer:
    """Scores responses with the rule reward in-process, or with the reward role's model; with a
    process reward model (reward.type prm) the role scores every step and the rule, if any, gives
    the outcome score."""

    def __init__(self, ctx: Context, tokenizer=None):
        from rlhf_trainer.rewards import build_reward_fn, describe_reward

        reward = ctx.cfg.reward
        self.type, self.tokenizer, self.hp = reward.type, tokenizer, ctx.hp
        self.skip_pattern, self.normalize = reward.skip_pattern, reward.normalize_steps
        self.rule = build_reward_fn(dataclasses.replace(reward, type="rule")) if reward.rule else None
        self.client = None if reward.type == "rule" else ctx.client("reward")
        # How the non-finite guard names what scored the batch (finite.py).
        model_path = ctx.cfg.reward_model.path if ctx.cfg.reward_model is not None else ""
        rule = describe_reward(reward) if self.rule is not None else ""
        if reward.type == "model":
            self.source = f"the reward model {model_path}"
        elif reward.type == "prm":
            self.source = f"the process reward model {model_path}" + (f" and {rule}" if rule else "")
        else:
            self.source = rule
        if reward.type == "prm":
            try:
                re.compile(reward.skip_pattern)
            except re.error as exc:
                raise ConfigError(f"reward.skip_pattern: invalid regular expression: {exc}") from exc

    def __call__(self, prompts: list[Prompt], responses: list[str], answers: list[str | None]) -> torch.Tensor:
        """(B,) outcome scores: the rule's, the reward model's, or 0 for a PRM without a rule."""
        # Conversations go out as lists of message dicts (TRL's conversational form; JSON over the bridge).
        prompts = [p if isinstance(p, str) else [dict(m) for m in p] for p in prompts]
        if self.type == "model":
            return self.client.call("score", prompts=prompts, responses=responses)[0]["scores"].float()
        if self.rule is not None:
            return torch.tensor(self.rule(prompts, responses, answers), dtype=torch.float32)
        return torch.zeros(len(responses))

    def step_rewards(self, roll: Rollout) -> torch.Tensor | None:
        """(B, R) process rewards of a rollout at the tokens ending its steps (losses.prm), or None
        unless reward.type is prm."""
        if self.type != "prm":
            return None
        from rlhf_trainer.losses.prm import dense_step_rewards
        from rlhf_trainer.stepwise import split_steps, step_token_ends, step_weights, token_char_ends

        separator = self.hp.step_separator
        prompts = [p if isinstance(p, str) else [dict(m) for m in p] for p in roll.prompts]
        out = self.client.call("step_scores", prompts=prompts, responses=roll.responses, separator=separator)[0]
        R = roll.action_mask.shape[1]
        scores, ends, weights = [], [], []
        for i, response in enumerate(roll.responses):
            steps = split_steps(response, separator)
            ids = roll.sequences[i, -R:][roll.action_mask[i].bool()].tolist()
            scores.append(out["scores"][i, :len(steps)].tolist())
            ends.append(step_token_ends([s.end for s in steps], token_char_ends(self.tokenizer, ids)))
            weights.append(step_weights(steps, self.skip_pattern))
        return dense_step_rewards(scores, ends, weights, R, normalise=self.normalize)


def on_actions(values: torch.Tensor | None, action_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, R) values with the positions outside the response (padding after EOS) set to 0."""
    return None if values is None else torch.where(action_mask.bool(), values, torch.zeros_like(values))


def rollout_ok(ctx: Context, exp: Experience, roll: Rollout, records, source: str) -> bool:
    """The non-finite checks of a scored rollout, on every actor rank (finite.py): the scores
    first, then what the actor, reference and critic computed. False: skip the batch."""
    guard = ctx.guard
    if not guard.batch_ok("reward", {"scores": exp.scores, "turn_scores": exp.turn_scores}, records, source=source,
                          responses=roll.responses):
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


def watch_rollout(ctx: Context, exp: Experience) -> dict[str, Any]:
    """The step's alarm signals and the alarms they fire (rlhf_trainer.alarms), from a trained rollout
    (exp.kl per token): merged into the step's stats by the loops, `alarms` as reason -> message."""
    if ctx.alarms is None:
        return {}
    mask = exp.action_mask
    kl = exp.kl if exp.kl is not None else torch.zeros(mask.shape, device=mask.device)
    response_ids = exp.sequences[:, -mask.shape[1]:]
    lengths = mask.float().sum(-1)
    signals, alarms = ctx.alarms.step(
        kl=alarm_signals.kl_signals(kl, mask, reduce=distributed.all_reduce_tensor),
        length=float(lengths.mean()), distinct=alarm_signals.distinct_2(response_ids.cpu(), mask.cpu()),
        reward=float(exp.scores.mean()))
    return {**signals, "alarms": alarms}


def skipped_rollout_stats(exp: Experience) -> dict[str, float]:
    """A skipped rollout's step stats: what was sampled, no loss (finite scores' mean only)."""
    finite = exp.scores[torch.isfinite(exp.scores)]
    return {"reward_mean": float(finite.mean()) if len(finite) else float("nan"),
            "response_length": float(exp.action_mask.float().sum(-1).mean()), "tokens": 0.0}


def encode_pairs(rows: list[PairRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs -> one right-padded (2B, T) batch: rows 0..B-1 chosen, B..2B-1 rejected."""
    prompts = [r.prompt for r in rows]
    return pad_right(prompts + prompts, [r.chosen for r in rows] + [r.rejected for r in rows], pad_token_id)


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


def text_pipeline(ctx: Context) -> Renderer:
    """The policy tokenizer's Renderer: how prompts and responses become its tokens (dataset.template),
    with every EOS id of the model as a stop token."""
    path = ctx.cfg.model.path
    tokenizer = models.load_tokenizer(path)
    stops = stop_token_ids(tokenizer, *models.generation_settings(path))
    return Renderer(tokenizer, ctx.cfg.dataset.template, stop_ids=stops)


def load_rows(ctx: Context, renderer: Renderer) -> list[Row]:
    """The training rows, read and tokenized before any model is built, so bad data fails fast (exit 65)
    and so does a dataset the length settings would truncate too much (exit 78, rlhf_trainer.tokenized)."""
    cfg, hp = ctx.cfg, ctx.hp
    kind = ALGORITHMS[cfg.algorithm].data
    records = load_dataset(cfg.dataset.path, cfg.dataset.format, kind=kind, fields=cfg.dataset.fields.mapping())
    limits = {"max_prompt_length": hp.max_prompt_length, "max_length": hp.max_length}
    rows, report = tokenize_records(records, renderer, kind, step_separator=hp.step_separator, **limits)
    if ctx.env.rank == 0:
        log(f"dataset {cfg.dataset.path}: {report.describe()}")
    ctx.metrics.set_dataset(report.rows, report.truncated, report.dropped)
    message = truncation_error(report, cfg.dataset.path, kind, max_share=hp.max_truncated_share, **limits)
    if message:
        raise ConfigError(message)
    if not rows:
        raise DataError(f"dataset {cfg.dataset.path}: no pairs left after dropping {report.dropped} identical ones")
    if cfg.dataset.eval_path:  # held-out rows, the same format and lengths (algorithms/evaluation.py)
        records = load_dataset(cfg.dataset.eval_path, cfg.dataset.format, kind=kind,
                               fields=cfg.dataset.fields.mapping())
        ctx.eval_records, _ = tokenize_records(records, renderer, kind, step_separator=hp.step_separator, **limits)
    return rows


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


def export(ctx: Context, algorithm) -> Path:
    """The final model as a Hugging Face folder at $RLHF_CHECKPOINT_DIR/export (rank 0 writes).

    A LoRA actor exports its adapters folded into a fresh base (roles.actor.lora.export merged) or
    peft's adapter folder (adapter), rlhf_trainer.lora.write_export."""
    strategy, tokenizer = algorithm.strategy, algorithm.tokenizer
    state = strategy.full_state_dict()  # collective under ZeRO-3
    final = Path(ctx.env.checkpoint_dir) / wire.EXPORT_DIR
    if distributed.world_rank() == 0:
        tmp = final.with_name(f".{wire.EXPORT_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        adapters = ctx.cfg.roles["actor"].lora
        if adapters.rank:
            from rlhf_trainer import lora

            merged = lora.write_export(state, adapters, algorithm.load_base, classifier=algorithm.classifier, folder=tmp)
            if merged is None:
                tokenizer.save_pretrained(tmp)
            else:
                models.save_pretrained(merged, tokenizer, tmp)
        else:
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


def drive(ctx: Context, algorithm, rows) -> None:
    """Run `algorithm` on `rows` from the newest complete checkpoint (or step 0) to max_steps, then export."""
    hp = ctx.hp
    sampler = Sampler(len(rows), hp.batch_size, seed=hp.seed)
    savers = _savers(ctx, algorithm.strategy)
    checkpoint.seed_rank_stream(hp.seed, ctx.env.rank)
    start = resume_step(ctx) or 0
    if start:
        for role, saver in savers.items():
            state = saver.load(start)
            if role == "actor":
                sampler.load_state_dict(state["data"])
                algorithm.load_state_dict(state["algorithm"])
                if ctx.alarms is not None and state.get("alarms") is not None:  # older checkpoints have none
                    ctx.alarms.load_state_dict(state["alarms"])
        ctx.metrics.set_checkpoint_step(start)
        ctx.metrics.gauges["step"].set(start)
        log(f"actor-{ctx.env.rank}: resumed from step {start}")
    ranks = ctx.placements["actor"].ranks
    if start == 0 and ctx.eval_records:
        ctx.metrics.record_step(0, run_eval(ctx, algorithm))  # the initial policy, for comparison
    last_save: float | None = None  # seconds the last save took in this process
    for step in range(start + 1, hp.max_steps + 1):
        batch = [rows[i] for i in shard(sampler.next_batch(), ctx.env.rank, ranks)]
        timings: dict[str, float] = {}
        ctx.guard.step = step
        skipped_before = sum(ctx.guard.skipped.values())
        t0 = time.perf_counter()
        stats = algorithm.step(batch, timings)
        elapsed = time.perf_counter() - t0
        stats["truncated_rows"] = float(sum(r.truncated for r in batch))
        stats = mean_over_ranks(stats)
        sums = {k: distributed.all_reduce_sum(stats.pop(k, 0.0)) for k in SUMMED}
        stats.update(timings, truncated_rows=sums["truncated_rows"], tokens_per_second=sums["tokens"] / elapsed,
                     step_seconds=elapsed)
        if ctx.guard.policy == "skip":
            stats["non_finite_skipped"] = float(sum(ctx.guard.skipped.values()) - skipped_before)
        saved = step % ctx.cfg.checkpoint.interval_steps == 0 or step == hp.max_steps
        step_alarms = stats.pop("alarms", None)
        if saved and ctx.eval_records:
            stats.update(run_eval(ctx, algorithm))
            if ctx.alarms is not None and step_alarms is not None:
                step_alarms = alarm_signals.merge(step_alarms, ctx.alarms.evaluated(stats.get("eval_reward_mean")))
        if step_alarms is not None:
            publish_alarms(ctx, step, step_alarms)
            stats["alarms"] = step_alarms
        stats.update(ctx.served_peak_memory)  # this rank's serving processes', per op (roles.RemoteClient)
        ctx.served_peak_memory.clear()
        if start and step == start + 1:  # a resume that redoes no step leaves no other trace in the file
            stats["resumed_from"] = float(start)
        ctx.metrics.record_step(step, stats)
        if ctx.env.rank == 0:
            log(f"step {step}/{hp.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in stats.items()
                                                         if isinstance(v, int | float)))
        state = {"data": sampler.state_dict(), "algorithm": algorithm.state_dict(),
                 "alarms": ctx.alarms.state_dict() if ctx.alarms is not None else None}
        if saved:
            t_save = time.perf_counter()
            with ctx.metrics.phase("sync"):
                save_step(ctx, step, savers, state)
            last_save = time.perf_counter() - t_save
        if step < hp.max_steps and stop_requested(ctx):
            saved = saved or save_before_stop(ctx, step, savers, state, last_save)
            stop_servers(ctx)
            raise Stopped(step, saved)
    if algorithm.strategy is None:  # nothing trained (prm-label): no weights to check
        algorithm.export(ctx)
    else:
        ctx.guard.check_updated("actor", hp.max_steps - start)
        export(ctx, algorithm)
    stop_servers(ctx)
    log(f"actor-{ctx.env.rank}: done")


def publish_alarms(ctx: Context, step: int, alarms: dict[str, str]) -> None:
    """The alarms firing at `step` (actor rank 0's decide; it logs them) go to the metrics."""
    ctx.metrics.set_alarms(alarms, alarm_signals.REASONS)
    if ctx.env.rank == 0:
        for reason, message in alarms.items():
            log(f"step {step}: ALARM {reason}: {message}")


def stop_servers(ctx: Context) -> None:
    """Tell every serving process this actor rank talks to that it is done."""
    for dst in ctx.remote_hosts():
        ctx.bridge.send(dst, "stop")
        ctx.bridge.recv(dst)


def stop_requested(ctx: Context) -> bool:
    """Any actor rank was told to stop (its own SIGTERM or another pod's marker): all ranks agree."""
    mine = ctx.stop is not None and ctx.stop.requested()
    return distributed.all_reduce_sum(1.0 if mine else 0.0) > 0


def save_before_stop(ctx: Context, step: int, savers, state: dict[str, Any], last_save: float | None) -> bool:
    """The last checkpoint of a stopped gang, when every actor rank finds it fits in its grace left."""
    fits = ctx.stop is None or stopping.can_save(ctx.stop.seconds_left(), last_save)
    if distributed.all_reduce_sum(1.0 if fits else 0.0) < distributed.world_size():
        log(f"actor-{ctx.env.rank}: told to stop after step {step}; no time left to save it")
        return False
    log(f"actor-{ctx.env.rank}: told to stop after step {step}; saving it first")
    save_step(ctx, step, savers, state)
    return True
