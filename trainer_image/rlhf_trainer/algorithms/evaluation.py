"""Held-out evaluation (`dataset.eval_path`): what the policy does on rows it never trains on.

| loop (algorithms)| metrics (JSONL names; `rlhf_trainer_` + name on /metrics)                         |
|-----------------|-------------------------------------------------------------------------------------|
| ppo, grpo (grpo,| eval_reward_mean (greedy answers), eval_pass_rate (greedy, share scoring >= 1.0,    |
| rloo, reinforce_pp)| rule rewards only), eval_reward_mean_sampled (at the sampling temperature); with    |
|                 | turns > 1 the last turn's, plus eval_accuracy_t1 / _t2 / _delta, eval_wrong_to_right,|
|                 | eval_right_to_wrong of the greedy conversations (rule rewards only)                 |
| dpo (dpo, simpo,| eval_preference_accuracy (implicit reward of chosen > rejected), eval_loss (the     |
| orpo, cpo)      | preference loss, without ORPO's and CPO's NLL term)                                 |
| rm              | eval_preference_accuracy (score of chosen > rejected), eval_loss (Bradley-Terry)    |
| sft             | eval_loss (response tokens), eval_exact_match (greedy answer == reference, trimmed) |

`drive()` runs it before the first step (step 0, the initial policy), at every checkpoint step and
at the last step. Rows are sharded over the actor ranks; every rank runs the same forwards (ZeRO-3
generation is collective) and the means are weighted by rows. As TRL's `eval_strategy` / OpenRLHF's
`eval_steps`, but tied to the checkpoint interval. Algorithms without an evaluator here (prm,
prm-label) report no eval metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rlhf_contract.algorithms import ALGORITHMS

from rlhf_trainer import distributed
from rlhf_trainer.algorithms.common import encode_pairs, generate, pair_slices
from rlhf_trainer.data import pad_right, position_ids_from_mask, shard
from rlhf_trainer.forward import sequence_scores, token_logprobs
from rlhf_trainer.losses.dpo import preference_logprobs
from rlhf_trainer.losses.rm import bradley_terry_loss
from rlhf_trainer.losses.sft import sft_loss
from rlhf_trainer.tokenized import PromptRow

# A rule reward's score of a right answer (rewards.CORRECT): at or above it, a greedy answer "passes".
PASS_SCORE = 1.0

# Each returns (sums of per-row values by metric name, rows evaluated) for this rank's rows.
Sums = tuple[dict[str, float], int]


def _answers_right(responses: list[str], references: list[str]) -> int:
    return sum(r.strip() == ref.strip() for r, ref in zip(responses, references, strict=True))


@torch.no_grad()
def evaluate_online(algorithm, rows) -> Sums:
    """Greedy and sampled answers to the held-out prompts (PromptRow), scored like the training samples."""
    hp, prompts, answers = algorithm.hp, [r.prompt for r in rows], [r.answer for r in rows]
    algorithm.strategy.eval()
    model, tokenizer, stops = algorithm.strategy.module, algorithm.tokenizer, algorithm.stop_ids
    synced = algorithm.strategy.synced_generation
    if hp.turns > 1:
        return evaluate_turns(algorithm, rows)
    greedy = generate(model, tokenizer, rows, hp, stops, synced_gpus=synced, greedy=True)
    sampled = generate(model, tokenizer, rows, hp, stops, synced_gpus=synced)
    greedy_scores = algorithm.score(prompts, greedy.responses, answers).float()
    sampled_scores = algorithm.score(prompts, sampled.responses, answers).float()
    sums = {"eval_reward_mean": float(greedy_scores.sum()), "eval_reward_mean_sampled": float(sampled_scores.sum())}
    if algorithm.score.rule is not None:
        sums["eval_pass_rate"] = float((greedy_scores >= PASS_SCORE).sum())
    return sums, len(rows)


@torch.no_grad()
def evaluate_turns(algorithm, rows) -> Sums:
    """Multi-turn jobs (hyperparameters.turns > 1): the same conversations as training (rlhf_trainer.multiturn),
    greedy and sampled; the rewards are the last turn's, plus the greedy attempts' accuracy at the first and
    last turn and the shares wrong -> right and right -> wrong (self_correction.correction_metrics)."""
    from rlhf_trainer.multiturn import environment_of, rollout
    from rlhf_trainer.self_correction import correction_metrics

    hp, answers, n = algorithm.hp, [r.answer for r in rows], len(rows)
    model, synced, environment = algorithm.strategy.module, algorithm.strategy.synced_generation, environment_of(hp)
    scores = {}
    for mode, greedy in (("greedy", True), ("sampled", False)):
        roll = rollout(model, algorithm.renderer, rows, hp, environment, synced_gpus=synced, greedy=greedy)
        scores[mode] = torch.stack([algorithm.score([p[k] for p in roll.turn_prompts],
                                                    [t[k] for t in roll.turn_responses], answers).float()
                                    for k in range(hp.turns)], dim=1)
    sums = {"eval_reward_mean": float(scores["greedy"][:, -1].sum()),
            "eval_reward_mean_sampled": float(scores["sampled"][:, -1].sum())}
    if algorithm.score.rule is not None:
        sums["eval_pass_rate"] = float((scores["greedy"][:, -1] >= PASS_SCORE).sum())
        sums.update({f"eval_{k}": v * n for k, v in correction_metrics(scores["greedy"], PASS_SCORE).items()})
    return sums, n


@torch.no_grad()
def evaluate_dpo(algorithm, rows) -> Sums:
    """DPO and the reference-free SimPO / ORPO / CPO (algorithms.dpo's preference_loss on the same log-probs)."""
    from rlhf_trainer.algorithms.dpo import response_columns

    hp, n = algorithm.hp, len(rows)
    batch = {k: v.to(distributed.device()) for k, v in encode_pairs(rows, algorithm.tokenizer.pad_token_id).items()}
    ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    R = response_columns(loss_mask)
    ref = None
    if algorithm.reference is not None:
        ref_logprobs = algorithm.reference.call("logprobs", {"input_ids": ids, "attention_mask": attn},
                                                response_length=R)[0]["logprobs"]
        ref = preference_logprobs(ref_logprobs.to(ids.device), loss_mask, algorithm.kind)
    algorithm.strategy.eval()
    correct = loss = 0.0
    for mb in pair_slices(n, hp.micro_batch_size):
        logprobs = token_logprobs(algorithm.strategy.forward, ids[mb], attn[mb], response_length=R,
                                  padding_free=hp.padding_free)[0]
        logp = preference_logprobs(logprobs, loss_mask[mb], algorithm.kind)
        half = len(mb) // 2
        out = algorithm.preference_loss(logp[:half], logp[half:], None if ref is None else ref[mb])
        correct += float(out.accuracy) * half
        loss += float(out.loss) * half
    return {"eval_preference_accuracy": correct, "eval_loss": loss}, n


@torch.no_grad()
def evaluate_rm(algorithm, rows) -> Sums:
    hp, n = algorithm.hp, len(rows)
    batch = {k: v.to(distributed.device()) for k, v in encode_pairs(rows, algorithm.tokenizer.pad_token_id).items()}
    algorithm.strategy.eval()
    correct = loss = 0.0
    for mb in pair_slices(n, hp.micro_batch_size):
        scores = sequence_scores(algorithm.strategy.forward, batch["input_ids"][mb], batch["attention_mask"][mb])
        half = len(mb) // 2
        correct += float((scores[:half] > scores[half:]).float().sum())
        loss += float(bradley_terry_loss(scores[:half], scores[half:], margin=hp.margin)) * half
    return {"eval_preference_accuracy": correct, "eval_loss": loss}, n


@torch.no_grad()
def evaluate_sft(algorithm, rows) -> Sums:
    """Token-mean loss on the references (ResponseRow), and whether the greedy answer equals the reference."""
    hp, dev, tokenizer = algorithm.hp, distributed.device(), algorithm.tokenizer
    batch = pad_right([r.prompt for r in rows], [r.response for r in rows], tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100).to(dev)
    ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    algorithm.strategy.eval()
    loss_sum, tokens = 0.0, float((labels[:, 1:] != -100).sum())
    for start in range(0, len(rows), hp.micro_batch_size):
        mb = slice(start, start + hp.micro_batch_size)
        logits = algorithm.strategy.forward(input_ids=ids[mb], attention_mask=attn[mb],
                                            position_ids=position_ids_from_mask(attn[mb]), use_cache=False).logits
        loss_sum += float(sft_loss(logits, labels[mb], num_tokens=1.0))  # summed over the micro-batch's tokens
    prompts = [PromptRow(ids=r.prompt, truncated=r.truncated, prompt="", answer=None, source=r.source) for r in rows]
    greedy = generate(algorithm.strategy.module, tokenizer, prompts, hp, algorithm.stop_ids,
                      synced_gpus=algorithm.strategy.synced_generation, greedy=True)
    references = tokenizer.batch_decode([list(r.response) for r in rows], skip_special_tokens=True)
    # eval_loss is a token mean: weight it by tokens / rows so the row-weighted mean over ranks stays one.
    n = len(rows)
    return {"eval_loss": loss_sum / max(tokens, 1.0) * n,
            "eval_exact_match": float(_answers_right(greedy.responses, references))}, n


# By the algorithm's loop (its module in the contract's table): a variant sharing a loop shares its metrics.
EVALUATORS: dict[str, Callable] = {
    "ppo": evaluate_online, "grpo": evaluate_online, "dpo": evaluate_dpo, "rm": evaluate_rm, "sft": evaluate_sft,
}


def evaluate(ctx, algorithm, rows) -> dict[str, float]:
    """Every eval metric of `algorithm` on the tokenized held-out `rows`, averaged over rows of all actor ranks."""
    evaluator = EVALUATORS.get(ALGORITHMS[ctx.cfg.algorithm].module)
    if evaluator is None:
        return {}
    ranks = ctx.placements["actor"].ranks
    sums, rows = evaluator(algorithm, shard(rows, ctx.env.rank, ranks))
    total = distributed.all_reduce_sum(rows)
    return {name: distributed.all_reduce_sum(value) / max(total, 1.0) for name, value in sorted(sums.items())}
