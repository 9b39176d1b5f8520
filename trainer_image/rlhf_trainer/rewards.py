"""Rule rewards: score responses without a reward model (`reward.type: rule`).

Every reward function has the signature (prompts, responses, answers) -> list[float], one score
per response; `answers` are the dataset's reference answers (None where a row has none).

- exact_match: 1.0 if the first number in the response equals the answer, 0.1 for a wrong
  number, 0.0 when the response holds no number at all. The 0.1 is a format bonus: it tells a
  policy "answer with a number" long before it answers correctly. Non-numeric answers compare
  the response's first line (trimmed, case-insensitive, trailing punctuation dropped): 1.0 / 0.1
  for a wrong non-empty line / 0.0 for an empty response.
- regex: 1.0 if `reward.pattern` matches anywhere in the response (re.search), else 0.0.
- callable: `reward.callable` = "module:function", imported from the image's Python path.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

from rlhf_contract.config import RewardConfig

from rlhf_trainer.errors import ConfigError, DataError

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str | None]], list[float]]

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
CORRECT, WRONG, UNPARSEABLE = 1.0, 0.1, 0.0


def first_number(text: str) -> float | None:
    match = NUMBER.search(text.replace(",", ""))  # "1,000" is one number
    return float(match.group()) if match else None


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip().rstrip(".!?").strip().lower() if lines else ""


def exact_match_score(response: str, answer: str) -> float:
    expected = first_number(answer) if NUMBER.fullmatch(answer.strip().replace(",", "")) else None
    if expected is not None:
        got = first_number(response)
        if got is None:
            return UNPARSEABLE
        return CORRECT if math.isclose(got, expected, rel_tol=0, abs_tol=1e-9) else WRONG
    line = _first_line(response)
    if not line:
        return UNPARSEABLE
    return CORRECT if line == _first_line(answer) else WRONG


def exact_match(prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    scores = []
    for prompt, response, answer in zip(prompts, responses, answers, strict=True):
        if answer is None:
            raise DataError(f"exact_match reward: the prompt {prompt[:60]!r} has no 'answer' in the dataset")
        scores.append(exact_match_score(response, answer))
    return scores


def regex_reward(pattern: str) -> RewardFn:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"reward.pattern: invalid regular expression {pattern!r}: {exc}") from exc

    def score(prompts, responses, answers):
        return [1.0 if compiled.search(response) else 0.0 for response in responses]

    return score


def import_callable(spec: str) -> Callable:
    """"package.module:function" -> the function; any failure is a ConfigError naming the field."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward.callable: expected \"module:function\", got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward.callable: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward.callable: {module_name} has no function {attr!r}")
    return fn


def callable_reward(spec: str) -> RewardFn:
    fn = import_callable(spec)

    def score(prompts, responses, answers):
        result = fn(list(prompts), list(responses), list(answers))
        try:
            values = [float(v) for v in result]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"reward.callable: {spec} must return a list of numbers: {exc}") from exc
        if len(values) != len(responses):
            raise ConfigError(f"reward.callable: {spec} returned {len(values)} scores for {len(responses)} responses")
        return values

    return score


def describe_reward(reward: RewardConfig) -> str:
    """How a rule reward is named in messages: `reward.callable nan_reward:score`, `reward.rule exact_match`."""
    if reward.rule == "callable":
        return f"reward.callable {reward.callable}"
    if reward.rule == "regex":
        return f"reward.rule regex {reward.pattern!r}"
    return f"reward.rule {reward.rule}"


def build_reward_fn(reward: RewardConfig) -> RewardFn:
    """The rule named by the config (reward.type must be rule)."""
    if reward.type != "rule":
        raise ConfigError(f"reward.type: {reward.type!r} is scored by the reward role, not by a rule")
    if reward.rule == "exact_match":
        return exact_match
    if reward.rule == "regex":
        return regex_reward(reward.pattern)
    if reward.rule == "callable":
        return callable_reward(reward.callable)
    raise ConfigError(f"reward.rule: {reward.rule!r} is not one of exact_match, regex, callable")
