"""PRM data labelling (`algorithm: prm-label`): sample responses from a policy, find each one's first
wrong step by binary search with best-of-N completions of its prefixes, write TRL's stepwise rows.

Seed slides (process supervision for code RL); rlhf_trainer.stepwise: a prefix of k steps is
completable when one of `prm_completions` completions sampled from prompt + prefix passes the
verifier, the rule reward named by `reward.rule` (exact_match, regex, or a callable
that runs unit tests); a response passes when the rule scores it >= 1. Every response of a batch is
searched in lockstep: one generate call per round for all open searches, O(log steps) rounds.

Per step, `batch_size` prompts (this rank's share) each get `group_size` responses. Labelled rows
accumulate in the checkpoint (resumed like any state); at the end they are written to
$RLHF_CHECKPOINT_DIR/export/prm_labels.jsonl ({"prompt", "completions", "labels"}), which an
`algorithm: prm` job reads with dataset.format stepwise. Responses whose prompt is never
completed (not even from the empty prefix) teach nothing and are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from rlhf_contract.config import REWARD_RULES, RewardConfig

from rlhf_trainer import distributed, models
from rlhf_trainer.algorithms.common import drive, generate, load_rows, text_pipeline
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.rewards import CORRECT, build_reward_fn
from rlhf_trainer.runtime import Context, log
from rlhf_trainer.stepwise import FirstWrongSearch, labels_from_first_wrong, prefix_text, split_steps
from rlhf_trainer.tokenized import PromptRow

OUTPUT_NAME = "prm_labels.jsonl"


def verifier(reward: RewardConfig):
    """The rule reward named by reward.rule (reward.type does not matter here: no reward role runs)."""
    if not reward.rule:
        raise ConfigError(f"reward.rule: prm-label needs a verifier rule, one of {', '.join(REWARD_RULES)}")
    return build_reward_fn(dataclasses.replace(reward, type="rule"))


def _plain(prompt):
    """A prompt as the rules and JSON take it: text, or a list of message dicts."""
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


class PRMLabelling:
    def __init__(self, ctx: Context, renderer):
        hp = self.hp = ctx.hp
        self.ctx = ctx
        self.tokenizer, self.stop_ids = renderer.tokenizer, renderer.stop_ids
        self.policy = models.load_policy(ctx.cfg.model.path, seed=hp.seed).to(distributed.device()).eval()
        self.verify = verifier(ctx.cfg.reward)
        self.strategy = None  # nothing is trained: checkpoints hold the rows and the data position
        self.rows: list[dict] = []

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state["rows"])

    def passes(self, rows: list[PromptRow], responses: list[str]) -> list[bool]:
        scores = self.verify([_plain(r.prompt) for r in rows], responses, [r.answer for r in rows])
        return [score >= CORRECT for score in scores]

    def with_prefix(self, row: PromptRow, prefix: str) -> PromptRow:
        """The prompt row continued by a response prefix (its text re-tokenized after the prompt's ids)."""
        ids = row.ids + tuple(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else row.ids
        return PromptRow(ids, row.truncated, row.prompt, row.answer, row.source)

    @torch.no_grad()
    def step(self, records, timings) -> dict[str, float]:
        hp, sep = self.hp, self.hp.step_separator
        records = [r for r in records for _ in range(hp.group_size)]
        with self.ctx.metrics.phase("generate", timings):
            roll = generate(self.policy, self.tokenizer, records, hp, self.stop_ids)
        responses = roll.responses
        steps = [split_steps(text, sep) for text in responses]
        searches = [FirstWrongSearch(len(s), ok) for s, ok in zip(steps, self.passes(records, responses), strict=True)]
        correct = sum(s.good == s.num_steps for s in searches)
        checks, n = 0, hp.prm_completions
        with self.ctx.metrics.phase("score", timings):
            # One round: every open search's next prefix, n completions each, in one generate call.
            while open_ := [i for i, s in enumerate(searches) if s.next_prefix() is not None]:
                prefixes = [prefix_text(responses[i], steps[i], searches[i].next_prefix(), sep) for i in open_]
                rows = [self.with_prefix(records[i], prefix) for i, prefix in zip(open_, prefixes, strict=True)
                        for _ in range(n)]
                completions = generate(self.policy, self.tokenizer, rows, hp, self.stop_ids).responses
                ok = self.passes(rows, [prefixes[j // n] + c for j, c in enumerate(completions)])
                for j, i in enumerate(open_):
                    searches[i].record(any(ok[j * n:(j + 1) * n]))
                checks += len(open_)
        labelled, first_wrong = 0, []
        for record, response_steps, search in zip(records, steps, searches, strict=True):
            if search.result is None or not response_steps:
                continue
            self.rows.append({"prompt": _plain(record.prompt), "completions": [s.text for s in response_steps],
                              "labels": labels_from_first_wrong(len(response_steps), search.result)})
            labelled += 1
            first_wrong.append(search.result / len(response_steps))
        return {
            "reward_mean": correct / len(records), "labelled_rows": float(labelled),
            "prefix_checks": float(checks), "first_wrong_position": sum(first_wrong) / max(len(first_wrong), 1),
            "tokens": float(roll.attention_mask.sum()),
        }

    def export(self, ctx: Context) -> Path:
        """Every rank's rows, in rank order, into export/prm_labels.jsonl (rank 0 joins the parts)."""
        folder = Path(ctx.env.checkpoint_dir) / "export"
        rank = distributed.world_rank()
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        distributed.role_barrier()
        (folder / f".part-{rank}").write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        distributed.role_barrier()
        final = folder / OUTPUT_NAME
        if rank == 0:
            parts = [folder / f".part-{r}" for r in range(distributed.world_size())]
            final.write_text("".join(p.read_text() for p in parts))
            for p in parts:
                p.unlink()
            log(f"{sum(1 for _ in final.open())} labelled rows in {final}")
        distributed.role_barrier()
        return final


def run(ctx: Context) -> None:
    renderer = text_pipeline(ctx)
    rows = load_rows(ctx, renderer)
    drive(ctx, PRMLabelling(ctx, renderer), rows)  # not an ActorAlgorithm: it has no model to train
