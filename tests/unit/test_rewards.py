"""rlhf_trainer.rewards: exact_match 1 / 0.1 / 0, regex, callable by import path."""

from __future__ import annotations

import pytest
from rlhf_contract.config import RewardConfig
from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.rewards import answers_equal, build_reward_fn, final_answer


@pytest.mark.parametrize(("response", "answer", "score"), [
    ("7", "7", 1.0),
    ("7</s>", "7", 1.0),
    (" The answer is 7.", "7", 1.0),
    ("7.0", "7", 1.0),
    ("1,000 apples", "1000", 1.0),
    ("-3", "-3", 1.0),
    ("8", "7", 0.1),
    ("77", "7", 0.1),
    ("3 + 4 = 7", "7", 1.0),  # a real model's answer: the LAST number counts (the first was 3)
    ("3 + 4 = 7\n\nThis is a classic example", "7", 1.0),
    ("I first thought 5, but it is 7", "7", 1.0),
    ("seven", "7", 0.0),
    ("", "7", 0.0),
    ("Paris.", "paris", 1.0),  # non-numeric answers compare the first line
    ("London", "Paris", 0.1),
    ("   ", "Paris", 0.0),
    ("The capital is Paris.\nThe answer is Paris.", "paris", 1.0),
])
def test_exact_match(response, answer, score):
    fn = build_reward_fn(RewardConfig(type="rule", rule="exact_match"))
    assert fn(["q"], [response], [answer]) == [score]


# (response, its final answer): the extraction order of rewards.final_answer
@pytest.mark.parametrize(("response", "extracted"), [
    pytest.param("so x = \\boxed{\\frac{1}{2}} and #### 3, the answer is 4, then 5", "\\frac{1}{2}", id="boxed-first"),
    pytest.param("\\boxed{1} then \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}", id="last-boxed-nested-braces"),
    pytest.param("Natalia sold 48/2 = 24 clips.\n#### 72\n", "72", id="gsm8k-hashes"),
    pytest.param("The answer is 12. Then 13 more.", "12", id="answer-is-before-last-number"),
    pytest.param("Final answer: 3.5 apples", "3.5 apples", id="final-answer-colon"),
    pytest.param("3 + 4 = 7", "7", id="last-number"),
    pytest.param("1,234,567 and 8", "8", id="last-number-thousands"),
    pytest.param("a ratio of 3/4", "3/4", id="fraction"),
    pytest.param("no digits here", None, id="none"),
])
def test_final_answer_extraction_order(response, extracted):
    assert final_answer(response) == extracted


@pytest.mark.parametrize(("got", "expected"), [
    ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("7.0", "7"), ("x=3", "3"), ("1,000", "1000"), ("50\\%", "0.5"),
    ("3.5 apples", "3.5"), ("\\dfrac{6}{4}", "1.5"),
])
def test_mathematically_equal_answers_are_equal(got, expected):
    assert answers_equal(got, expected)


@pytest.mark.parametrize(("got", "expected"), [("0.51", "1/2"), ("8", "7"), ("ab", "ba"), ("-7", "7")])
def test_different_answers_are_not(got, expected):
    assert not answers_equal(got, expected)  # ("ab", "ba"): words compare as text, not as products


def test_a_reference_with_a_marker_is_reduced_the_same_way():
    fn = build_reward_fn(RewardConfig(type="rule", rule="exact_match"))
    gsm8k = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"
    assert fn(["q", "q"], ["She sold \\boxed{72} clips.", "She sold 71."], [gsm8k, gsm8k]) == [1.0, 0.1]


def test_conversational_prompts_reach_the_rules():
    fn = build_reward_fn(RewardConfig(type="rule", rule="exact_match"))
    with pytest.raises(DataError, match="the prompt 'What is 3\\+4\\?' has no 'answer'"):
        fn([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3+4?"}]], ["7"], [None])


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
