"""Multi-turn rollouts: the policy answers, the environment replies, the policy answers again (issue 14).

    roll = rollout(model, renderer, rows, hp, environment_of(hp), synced_gpus=False)  # hp.turns policy turns

A rollout with `hyperparameters.turns` = K > 1 is a conversation: policy turn 1, an environment turn
(the fixed `turnInstruction`, e.g. SCoRe's "There might be an error in the solution above. Please
correct it."), policy turn 2, ..., policy turn K. Under a chat template the environment's message is a
user turn and its tokens are what the template writes between the two assistant turns
(Renderer.environment_ids); without one it is a plain line. As in verl's multi-turn rollouts
(`response_mask` / `loss_mask` over the whole continuation), the row is the prompt (left-padded, P
columns) and everything after it (right-padded, R columns), and ONLY the policy's sampled tokens are
actions: `action_mask` is 0 on the environment's tokens, so they get no policy loss, no KL and no
value loss, and GAE steps over them (losses.gae). `turn_ids` says which policy turn each action
token belongs to; every turn is scored on its own (algorithms.common.collect_experience) and its reward
lands on its last token (losses.turns).

An environment is any object with `reply(prompt, history) -> str` (history: the texts so far,
alternating policy turn and environment message): a user callable or a tool result can take the
fixed instruction's place without touching the loop. With K = 1 nothing here runs: single-turn
rollouts are common.generate's, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rlhf_trainer.algorithms.common import Rollout, generate, records_logprobs, sample
from rlhf_trainer.chat import Renderer, as_conversation
from rlhf_trainer.data import pad_left
from rlhf_trainer.records import Prompt
from rlhf_trainer.tokenized import PromptRow


class Environment(Protocol):
    def reply(self, prompt: Prompt, history: Sequence[str]) -> str:
        """The environment's message after the policy turn that ends `history`."""


@dataclass(frozen=True)
class FixedInstruction:
    """The same message after every policy turn (SCoRe's self-correction instruction, Kumar et al. 2024)."""

    message: str

    def reply(self, prompt: Prompt, history: Sequence[str]) -> str:
        return self.message


def environment_of(hp) -> Environment:
    """The environment a job's hyperparameters describe (turnInstruction)."""
    return FixedInstruction(hp.turn_instruction)


def conversation_before(prompt: Prompt, history: Sequence[str]) -> Prompt:
    """What a policy turn answers: the prompt itself for the first turn, else the conversation so far
    as message dicts (the prompt's turns, then assistant / user turns alternating)."""
    if not history:
        return prompt
    turns = as_conversation(prompt)
    turns += [{"role": "assistant" if i % 2 == 0 else "user", "content": text} for i, text in enumerate(history)]
    return turns


@torch.no_grad()
def rollout(model, renderer: Renderer, rows: list[PromptRow], hp, environment: Environment, *,
            synced_gpus: bool = False, greedy: bool = False) -> Rollout:
    """hp.turns policy turns per prompt row (common.generate when 1): a Rollout with turn_ids,
    turn_truncated, turn_responses and turn_prompts set, B rows, R = the longest continuation.

    Each policy turn samples at most hp.max_new_tokens tokens from the conversation so far, as
    common.generate does (the same sampling, chunks and `synced_gpus`: every rank makes hp.turns
    calls). responses are the decoded continuations, environment text included (for samples).
    """
    if hp.turns == 1:
        return generate(model, renderer.tokenizer, rows, hp, renderer.stop_ids, synced_gpus=synced_gpus, greedy=greedy)
    tokenizer, B = renderer.tokenizer, len(rows)
    continuation: list[list[int]] = [[] for _ in rows]  # ids after the prompt
    owner: list[list[int]] = [[] for _ in rows]  # per continuation token: its policy turn, or -1
    logprobs: list[list[float]] = [[] for _ in rows]  # per continuation token: its sampling log-prob, or 0
    keep_logprobs = records_logprobs(hp, greedy)
    history: list[list[str]] = [[] for _ in rows]
    turn_prompts: list[list[Prompt]] = [[] for _ in rows]
    texts: list[list[str]] = [[] for _ in rows]
    truncated = torch.zeros(B, hp.turns, dtype=torch.bool)
    for turn in range(hp.turns):
        if turn:  # the environment's turn
            for i, row in enumerate(rows):
                message = environment.reply(row.prompt, history[i])
                ids = renderer.environment_ids(row.prompt, history[i], message, ended=not bool(truncated[i, turn - 1]),
                                               where=row.source)
                history[i].append(message)
                continuation[i] += ids
                owner[i] += [-1] * len(ids)
                logprobs[i] += [0.0] * len(ids)
        for i, row in enumerate(rows):
            turn_prompts[i].append(conversation_before(row.prompt, history[i]))
        contexts = [list(r.ids) + c for r, c in zip(rows, continuation, strict=True)]
        _, response_ids, mask, ended, sampled = sample(model, tokenizer, contexts, hp, renderer.stop_ids,
                                                       synced_gpus=synced_gpus, greedy=greedy, logprobs=keep_logprobs)
        truncated[:, turn] = ~ended
        for i in range(B):
            ids = response_ids[i][mask[i].bool()].tolist()
            continuation[i] += ids
            owner[i] += [turn] * len(ids)
            if sampled is not None:
                logprobs[i] += sampled[i][mask[i].bool()].tolist()
            text = tokenizer.decode(ids, skip_special_tokens=True)
            texts[i].append(text)
            history[i].append(text)
    return assemble(rows, continuation, owner, truncated, texts, turn_prompts, tokenizer,
                    logprobs if keep_logprobs else None)


def assemble(rows: list[PromptRow], continuation: list[list[int]], owner: list[list[int]], truncated: torch.Tensor,
             texts: list[list[str]], turn_prompts: list[list[Prompt]], tokenizer,
             logprobs: list[list[float]] | None = None) -> Rollout:
    """Per-row prompt ids, continuation ids and their turn owners (and sampling log-probs) -> one Rollout:
    the prompts left-padded (B, P), the continuations right-padded (B, R), action_mask = turn_ids >= 0."""
    pad = tokenizer.pad_token_id
    enc = pad_left([list(r.ids) for r in rows], pad)
    width = max(len(c) for c in continuation)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    turn_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    sampled = None if logprobs is None else torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (c, o) in enumerate(zip(continuation, owner, strict=True)):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        real[i, :len(c)] = 1
        turn_ids[i, :len(o)] = torch.tensor(o, dtype=torch.long)
        if sampled is not None:
            sampled[i, :len(c)] = torch.tensor(logprobs[i], dtype=torch.float32)
    responses = [tokenizer.decode(c, skip_special_tokens=True) for c in continuation]
    return Rollout(
        sequences=torch.cat([enc["input_ids"], ids], dim=1), attention_mask=torch.cat([enc["attention_mask"], real], dim=1),
        action_mask=(turn_ids >= 0).long(), truncated=truncated.any(-1), prompts=[r.prompt for r in rows],
        responses=responses, turn_ids=turn_ids, turn_truncated=truncated, turn_responses=texts, turn_prompts=turn_prompts,
        sampled_logprobs=sampled,
    )


def turn_stats(exp, stage: int | None) -> dict[str, float]:
    """A multi-turn step's metrics ({} for a single-turn one): the first and last attempts' accuracy
    (a turn is right when it scores >= rewards.CORRECT, a rule reward's right answer), the shares
    changed wrong -> right and right -> wrong (self_correction.correction_metrics), each turn's mean
    score, and the SCoRe stage when selfCorrection is on."""
    if exp.turn_scores is None:
        return {}
    from rlhf_trainer.rewards import CORRECT
    from rlhf_trainer.self_correction import correction_metrics

    scores = exp.turn_scores.float()
    stats = correction_metrics(scores, CORRECT)
    stats.update({f"reward_t{k + 1}": float(scores[:, k].mean()) for k in range(scores.shape[1])})
    if stage is not None:
        stats["score_stage"] = float(stage)
    return stats
