"""rlhf_trainer.rewards: exact_match 1 / 0.1 / 0, regex, callable by import path."""

from __future__ import annotations

import pytest
from rlhf_contract.config import RewardConfig
from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.rewards import build_reward_fn


@pytest.mark.parametrize(("response", "answer", "score"), [
    ("7", "7", 1.0),
    ("7</s>", "7", 1.0),
    (" The answer is 7.", "7", 1.0),
    ("7.0", "7", 1.0),
    ("1,000 apples", "1000", 1.0),
    ("-3", "-3", 1.0),
    ("8", "7", 0.1),
    ("77", "7", 0.1),  # the first number is 77, not 7
    ("3 then 7", "7", 0.1),  # only the first number counts
    ("seven", "7", 0.0),
    ("", "7", 0.0),
    ("Paris.", "paris", 1.0),  # non-numeric answers compare the first line
    ("London", "Paris", 0.1),
    ("   ", "Paris", 0.0),
])
def test_exact_match(response, answer, score):
    fn = build_reward_fn(RewardConfig(type="rule", rule="exact_match"))
    assert fn(["q"], [response], [answer]) == [score]


def test_exact_match_needs_answers():
    fn = build_reward_fn(RewardConfig(type="rule", rule="exact_match"))
    with pytest.raises(DataError, match="has no 'answer'"):
        fn(["2+2="], ["4"], [None])


def test_regex_rule():
    fn = build_reward_fn(RewardConfig(type="rule", rule="regex", pattern=r"^\d+$"))
    assert fn(["a", "b", "c"], ["42", "42 apples", ""], [None, None, None]) == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="reward.pattern: invalid regular expression"):
        build_reward_fn(RewardConfig(type="rule", rule="regex", pattern="(unclosed"))


def test_callable_rule_imported_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def length(prompts, responses, answers):\n"
        "    return [len(r) + (a == r) for r, a in zip(responses, answers)]\n"
        "def wrong_count(prompts, responses, answers):\n"
        "    return [1.0]\n"
        "def not_numbers(prompts, responses, answers):\n"
        "    return ['x' for _ in responses]\n"
        "CONSTANT = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def rule(spec):
        return build_reward_fn(RewardConfig(type="rule", rule="callable", callable=spec))

    assert rule("my_scores:length")(["p", "q"], ["ab", "c"], ["ab", None]) == [3.0, 1.0]
    with pytest.raises(ConfigError, match="returned 1 scores for 2 responses"):
        rule("my_scores:wrong_count")(["p", "q"], ["a", "b"], [None, None])
    with pytest.raises(ConfigError, match="must return a list of numbers"):
        rule("my_scores:not_numbers")(["p"], ["a"], [None])
    with pytest.raises(ConfigError, match="has no function 'CONSTANT'"):
        rule("my_scores:CONSTANT")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        rule("no_such_module:f")
    with pytest.raises(ConfigError, match='expected "module:function"'):
        rule("my_scores")


def test_model_rewards_are_not_rules():
    with pytest.raises(ConfigError, match="reward.type"):
        build_reward_fn(RewardConfig(type="model"))
