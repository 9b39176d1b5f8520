"""Rule rewards: score responses without a reward model (`reward.type: rule`).

Every reward function has the signature (prompts, responses, answers) -> list[float], one score
per response; `prompts` are the dataset's prompts (text, or a list of chat messages), `answers` its
reference answers (None where a row has none).

- exact_match: the response's final answer against the reference answer: 1.0 when they are equal,
  0.1 when an answer was found but differs, 0.0 when the response holds none. The 0.1 is a format
  bonus: it tells a policy "give an answer" long before it answers correctly.
  The final answer is taken, in this order (the first rule that finds one wins):
    1. the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced;
    2. the text after the last `####` (GSM8K), to the end of its line;
    3. the text after the last "the answer is" / "final answer is" / "answer:" (any case), to the end of
       its sentence or line;
    4. the last number ("3 + 4 = 7" answers 7; "1,000" is one number);
    5. for a non-mathematical reference only: the first line.
  A reference answer holding a marker (1-3) is reduced the same way ("... #### 72" -> "72").
  Answers compare equal when their text does (trimmed, case-insensitive, `$` and trailing
  punctuation dropped) or, for a mathematical reference (one with a digit or a LaTeX command), when
  math-verify (Hugging Face's math answer verifier, on sympy) finds them mathematically equal:
  7 = 7.0, 1/2 = 0.5 = \\frac{1}{2}, 50% = 0.5, x=3 = 3.
- regex: 1.0 if `reward.pattern` matches anywhere in the response (re.search), else 0.0.
- callable: `reward.callable` = "module:function", imported from the image's Python path; it gets the
  prompts as the dataset holds them (text, or TRL's lists of message dicts).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

from rlhf_contract.config import RewardConfig

from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.records import prompt_text

RewardFn = Callable[[Sequence, Sequence[str], Sequence[str | None]], list[float]]

CORRECT, WRONG, UNPARSEABLE = 1.0, 0.1, 0.0
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
HASHES = re.compile(r"####[ \t]*([^\n]*)")
ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*([^\n]*)|answer:\s*([^\n]*)", re.IGNORECASE)
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
MATH_LIKE = re.compile(r"\d|\\[A-Za-z]")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, with nested braces; None if there is none (or it is unclosed)."""
    starts = [m.end() for m in BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def _sentence(text: str) -> str:
    """An answer phrase up to the end of its sentence: "7. Then ..." -> "7" (decimals are kept)."""
    return re.split(r"(?<!\d)\.(?!\d)|\.(?=\s|$)", text, maxsplit=1)[0].strip()


def final_answer(text: str) -> str | None:
    """The final answer of a response by the extraction order of this module's docstring (1-4)."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = HASHES.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    stated = [a or b for a, b in ANSWER_IS.findall(text)]
    if stated and _sentence(stated[-1]):
        return _sentence(stated[-1])
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normal(answer: str) -> str:
    return answer.strip().strip("$").strip().rstrip(".!?").strip().lower()


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def is_mathematical(answer: str) -> bool:
    return bool(MATH_LIKE.search(answer))


WORD = re.compile(r"[A-Za-z]{2,}")
LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")


def _math(answer: str) -> list:
    """math-verify's reading of an answer: as one LaTeX expression, or, when it holds words
    ("3.5 apples"), the expression math-verify extracts from the text ([] when none)."""
    from math_verify import parse  # imported on first use: ~3 s of sympy / antlr

    text = answer.strip().strip("$")
    return parse(text) if WORD.search(LATEX_COMMAND.sub("", text)) else parse(f"${text}$")


def answers_equal(got: str, expected: str) -> bool:
    """Equal as text, or (for a mathematical reference) equal as mathematics per math-verify."""
    if _normal(got) == _normal(expected):
        return True
    if not is_mathematical(expected):
        return False
    from math_verify import verify

    gold, target = _math(expected), _math(got)
    return bool(gold) and bool(target) and verify(gold, target)


def exact_match_score(response: str, answer: str) -> float:
    """1.0 / 0.1 / 0.0 for one response against its reference answer (see the module docstring)."""
    expected = final_answer(answer) if _boxed(answer) is not None or "####" in answer else answer
    got = final_answer(response)
    if got is None and not is_mathematical(expected):
        got = _first_line(response)
    if not got or not _normal(got):
        return UNPARSEABLE
    return CORRECT if answers_equal(got, expected) else WRONG


def exact_match(prompts: Sequence, responses: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    scores = []
    for prompt, response, answer in zip(prompts, responses, answers, strict=True):
        if answer is None:
            raise DataError(f"exact_match reward: the prompt {prompt_text(prompt)[:60]!r} has no 'answer' in the dataset")
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
