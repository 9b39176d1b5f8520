"""Steps of a response, for process reward models: splitting, encoding, and first-wrong-step search.

A response is a sequence of steps separated by `separator` (one line each by default, as the seed
slides' per-line PRM for code). The PRM's stepwise format is TRL's: {"prompt": str,
"completions": [step, ...], "labels": [bool | number in [-1, 1], ...]}.

Encoding follows TRL's PRMTrainer.tokenize_row: prompt tokens (rendered by rlhf_trainer.chat), then
every step's tokens followed by the separator's tokens; the step's label sits on the separator's
last token. Prompts keep their last max_prompt_length tokens; the row is cut at max_length tokens
(a step whose separator is cut off loses its label, and the row counts as truncated).

Labelling (seed slides; like Wang et al. 2024, "Math-Shepherd", which labels a step by whether
completions sampled from it reach the right answer): a prefix of k steps is "completable" when
some of N sampled completions from it passes the verifier. Completability is assumed monotone (a
prefix that holds a wrong step cannot be completed, so neither can any longer one), which makes
the first wrong step findable by binary search with O(log n) completability checks instead of n.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from rlhf_trainer.data import PromptRecord, StepRecord
from rlhf_trainer.errors import ConfigError

DEFAULT_SEPARATOR = "\n"


@dataclass(frozen=True)
class Step:
    text: str
    end: int  # character offset in the response just after the step's text (where its separator starts)


def split_steps(response: str, separator: str = DEFAULT_SEPARATOR) -> list[Step]:
    """The non-blank steps of `response` and where each ends; ValueError for an empty separator."""
    if not separator:
        raise ValueError("the step separator must not be empty")
    steps, start = [], 0
    while start <= len(response):
        cut = response.find(separator, start)
        end = len(response) if cut < 0 else cut
        if response[start:end].strip():
            steps.append(Step(response[start:end], end))
        if cut < 0:
            break
        start = cut + len(separator)
    return steps


class EncodedSteps(NamedTuple):
    ids: list[int]  # prompt + (step + separator) ids, cut at max_length
    positions: list[int]  # index of each kept step's separator-final token
    truncated: bool  # the prompt or some step's separator was cut
    full_length: int  # tokens before any cut


def encode_steps(tokenizer, prompt_ids: Sequence[int], steps: Sequence[str], separator: str, *,
                 max_prompt_length: int, max_length: int) -> EncodedSteps:
    """The prompt's ids (its last max_prompt_length, at most max_length - 1) + (step + separator) ids
    per step, cut at max_length; a step whose separator is cut loses its label position."""
    keep = max(1, min(max_prompt_length, max_length - 1))
    prompt = list(prompt_ids[-keep:])
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    completion: list[int] = []
    positions: list[int] = []
    budget = max_length - len(prompt)
    for step in steps:
        completion += tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        if len(completion) <= budget:
            positions.append(len(prompt) + len(completion) - 1)
    truncated = len(prompt) < len(prompt_ids) or len(positions) < len(steps)
    return EncodedSteps(prompt + completion[:budget], positions, truncated, len(prompt_ids) + len(completion))


class FirstWrongSearch:
    """The binary search of one response's first wrong step, one completability check at a time, so
    many responses can be searched in lockstep (one batch of completions per round).

        search = FirstWrongSearch(num_steps, response_correct)
        while (k := search.next_prefix()) is not None:
            search.record(completable(k))
        search.result   # first wrong step (0-based), num_steps if none, None if the prompt is hopeless

    The empty prefix (the prompt alone) is checked first: when even it cannot be completed, nothing
    can be learned about the steps and the result is None. A correct response has no wrong step and
    needs no check. Invariant afterwards: prefix `good` is completable, prefix `bad` is not.
    """

    def __init__(self, num_steps: int, response_correct: bool):
        self.num_steps = num_steps
        self.good: int | None = num_steps if response_correct else None  # None: prefix 0 unchecked
        self.bad = num_steps
        self.hopeless = False

    def next_prefix(self) -> int | None:
        """The number of steps of the prefix to check next, or None when the search is over."""
        if self.hopeless or self.good == self.num_steps:
            return None
        if self.good is None:
            return 0
        return (self.good + self.bad) // 2 if self.bad - self.good > 1 else None

    def record(self, completable: bool) -> None:
        """The answer for the prefix next_prefix() returned."""
        k = self.next_prefix()
        if k is None:
            raise RuntimeError("the search is over: nothing to record")
        if completable:
            self.good = k
        elif k == 0:
            self.hopeless = True
        else:
            self.bad = k

    @property
    def result(self) -> int | None:
        if self.next_prefix() is not None:
            raise RuntimeError("the search is not over")
        return None if self.hopeless else self.bad - 1 if self.good != self.num_steps else self.num_steps


def first_wrong_step(num_steps: int, completable: Callable[[int], bool], *,
                     response_correct: bool) -> int | None:
    """Binary search of the first wrong step (0-based) of an n-step response; n when none is wrong.

    `completable(k)` says whether the prefix of the first k steps (0 <= k < n) can still be
    completed into a verified answer; O(log n) calls (FirstWrongSearch, one response at a time).
    """
    search = FirstWrongSearch(num_steps, response_correct)
    while (k := search.next_prefix()) is not None:
        search.record(completable(k))
    return search.result


def prefix_text(response: str, steps: Sequence[Step], k: int, separator: str) -> str:
    """The response's text up to and including the separator after its k-th step ("" for k = 0)."""
    return response[:steps[k - 1].end] + separator if k else ""


def step_weights(steps: Sequence[Step], skip_pattern: str) -> list[float]:
    """1 per step, 0 for steps `skip_pattern` (re.search) matches, e.g. comment lines; all 1 without one."""
    if not skip_pattern:
        return [1.0] * len(steps)
    compiled = re.compile(skip_pattern)
    return [0.0 if compiled.search(step.text) else 1.0 for step in steps]


def token_char_ends(tokenizer, response_ids: Sequence[int]) -> list[int]:
    """For each response token, the length of the text decoded from the tokens up to it (special tokens
    skipped, as the rollout decodes responses). O(R^2) characters decoded; R is a response's length."""
    return [len(tokenizer.decode(response_ids[:t + 1], skip_special_tokens=True)) for t in range(len(response_ids))]


def step_token_ends(step_ends: Sequence[int], char_ends: Sequence[int]) -> list[int]:
    """Character offsets where steps end -> the index of the token holding each step's last character
    (the first token whose decoded prefix reaches the offset); the last token when none does."""
    out = []
    for end in step_ends:
        index = next((t for t, reach in enumerate(char_ends) if reach >= end), len(char_ends) - 1)
        out.append(index)
    return out


def labels_from_first_wrong(num_steps: int, wrong: int) -> list[bool]:
    """Steps before the first wrong one are correct; it and every later step are not (by monotonicity)."""
    return [i < wrong for i in range(num_steps)]


# ---- synthetic multi-step task -----------------------------------------------------------------


def _partial_sum_problem(rng: random.Random, operands: int, max_operand: int) -> tuple[str, list[int]]:
    if operands < 2:
        raise ConfigError(f"dataset.path: partial sums need at least 2 operands, got {operands}")
    values = [rng.randint(0, max_operand) for _ in range(operands)]
    partial = [sum(values[:k + 1]) for k in range(1, operands)]
    return "+".join(map(str, values)) + "=", partial


def synthetic_partial_sums(size: int = 512, operands: int = 3, max_operand: int = 4,
                           seed: int = 0) -> list[PromptRecord]:
    """"3+4+2=" -> answer "9"; the worked solution writes one partial sum per line ("7\n9"), which
    exact_match verifies by its final line (the last number)."""
    rng = random.Random(seed)
    out = []
    for i in range(size):
        prompt, partial = _partial_sum_problem(rng, operands, max_operand)
        out.append(PromptRecord(prompt, str(partial[-1]), f"synthetic://partial_sums#{i}"))
    return out


def synthetic_partial_sum_steps(size: int = 512, operands: int = 3, max_operand: int = 4,
                                seed: int = 0) -> list[StepRecord]:
    """Stepwise rows of the same problems: half of them solved right (every label true), half with
    a first wrong step at a random line (off by 1..3) that later lines carry on from, labelled
    false from there on (the labels labels_from_first_wrong gives)."""
    rng = random.Random(seed)
    out = []
    for i in range(size):
        prompt, partial = _partial_sum_problem(rng, operands, max_operand)
        wrong = rng.randrange(len(partial)) if i % 2 else len(partial)
        error = rng.choice([-3, -2, -1, 1, 2, 3])
        steps = [str(p + error if k >= wrong else p) for k, p in enumerate(partial)]
        if any(int(step) < 0 for step in steps):  # a negative sum is too easy to spot
            steps = [str(p - error if k >= wrong else p) for k, p in enumerate(partial)]
        targets = tuple(1.0 if ok else 0.0 for ok in labels_from_first_wrong(len(steps), wrong))
        out.append(StepRecord(prompt, tuple(steps), targets, f"synthetic://partial_sum_steps#{i}"))
    return out


SYNTHETIC_STEPS = {
    "partial_sums": (synthetic_partial_sums, {"size": 512, "operands": 3, "max_operand": 4, "seed": 0}),
    "partial_sum_steps": (synthetic_partial_sum_steps, {"size": 512, "operands": 3, "max_operand": 4, "seed": 0}),
}
