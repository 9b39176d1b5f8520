"""Steps of a response, for process reward models: splitting, encoding, and first-wrong-step search.

A response is a sequence of steps separated by `separator` (one line each by default, as the seed
slides' per-line PRM for code). The PRM's stepwise format is TRL's: {"prompt": str,
"completions": [step, ...], "labels": [bool | number in [-1, 1], ...]}.

Encoding follows TRL's PRMTrainer.tokenize_row: prompt tokens, then every step's tokens followed by
the separator's tokens; the step's label sits on the separator's last token. Prompts keep their
last max_prompt_length tokens; the completion is cut after max_completion_length tokens (a step
whose separator is cut off loses its label).

Labelling (seed slides; like Wang et al. 2024, "Math-Shepherd", which labels a step by whether
completions sampled from it reach the right answer): a prefix of k steps is "completable" when
some of N sampled completions from it passes the verifier. Completability is assumed monotone (a
prefix that holds a wrong step cannot be completed, so neither can any longer one), which makes
the first wrong step findable by binary search with O(log n) completability checks instead of n.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def encode_steps(tokenizer, prompt: str, steps: Sequence[str], separator: str, *,
                 max_prompt_length: int, max_completion_length: int) -> tuple[list[int], list[int]]:
    """-> (input_ids, label_positions): token ids of prompt + (step + separator) * n, and for each
    step whose separator fits, the index of the separator's last token (TRL's label position)."""
    prompt_ids = tokenizer(prompt)["input_ids"][-max_prompt_length:]
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    completion: list[int] = []
    positions: list[int] = []
    for step in steps:
        completion += tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        if len(completion) > max_completion_length:
            break
        positions.append(len(prompt_ids) + len(completion) - 1)
    completion = completion[:max_completion_length]
    return prompt_ids + completion, positions


def first_wrong_step(num_steps: int, completable: Callable[[int], bool], *,
                     response_correct: bool) -> int | None:
    """Binary search of the first wrong step (0-based) of an n-step response; n when none is wrong.

    `completable(k)` says whether the prefix of the first k steps (0 < k < n) can still be
    completed into a verified answer. The empty prefix (the prompt alone) is checked first: when
    even it cannot be completed, nothing can be learned about the steps and None is returned.
    A correct response has no wrong step and costs no check.
    """
    if response_correct:
        return num_steps
    if not completable(0):
        return None
    good, bad = 0, num_steps  # prefix `good` is completable, prefix `bad` (all steps) is not
    while bad - good > 1:
        middle = (good + bad) // 2
        if completable(middle):
            good = middle
        else:
            bad = middle
    return bad - 1


def labels_from_first_wrong(num_steps: int, wrong: int) -> list[bool]:
    """Steps before the first wrong one are correct; it and every later step are not (by monotonicity)."""
    return [i < wrong for i in range(num_steps)]
