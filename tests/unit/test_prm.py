"""Process reward models: loss against TRL's cross-entropy, scores, metrics, dense rewards, and the
step helpers (splitting, TRL's encoding, the binary search of the first wrong step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rlhf_trainer import stepwise
from rlhf_trainer.losses import prm


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- loss, scores, metrics -----------------------------------------------------------------------


def test_boolean_labels_give_trls_token_classification_loss():
    logits = rand(2, 5, 2)
    hard = torch.tensor([[-100, 1, -100, 0, 1], [-100, -100, 0, -100, -100]])
    targets = hard.to(torch.float64).masked_fill(hard == -100, prm.IGNORE)
    want = F.cross_entropy(logits.view(-1, 2), hard.view(-1), ignore_index=-100)  # mean over the 4 labels
    assert prm.prm_loss(logits, targets).item() == pytest.approx(want.item())
    assert prm.prm_loss(logits, targets, num_labels=8).item() == pytest.approx(want.item() / 2)


def test_soft_targets_by_hand():
    # One labelled position, logits (0, log 3): p = 3/4; label 0 in [-1, 1] -> target 1/2:
    # loss = -(1/2 log 3/4 + 1/2 log 1/4).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert prm.label_target(0.0) == 0.5 and prm.label_target(True) == 1.0 and prm.label_target(-1) == 0.0
    got = prm.prm_loss(logits, torch.tensor([[0.5]])).item()
    assert got == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        prm.label_target(2)


def test_step_score_is_two_p_minus_one():
    logits = rand(3, 2)
    p = torch.softmax(logits, -1)[:, 1]
    assert prm.step_scores(logits).tolist() == pytest.approx((2 * p - 1).tolist())


def test_metrics_count_steps_and_first_wrong_steps():
    scores = [[0.9, 0.2, -0.5], [0.3, 0.4], [-0.1, 0.8]]
    targets = [[1.0, 1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    got = prm.step_metrics(scores, targets)
    # steps right: 3/3, 1/2, 1/2 -> 5 of 7; first wrong: (2, 2) yes, (2, 1) no, (0, 2) no -> 1 of 3
    assert got == {"steps": 7, "steps_correct": 5, "examples": 3, "first_wrong_correct": 1}


def test_dense_rewards_put_weighted_scores_at_step_ends():
    rewards = prm.dense_step_rewards([[0.5, -1.0, 0.25], [1.0]], [[1, 3, 4], [0]], [[1, 0, 1], [1]], 6,
                                     normalise=False)
    assert rewards.tolist() == [[0, 0.5, 0, 0, 0.25, 0], [1.0, 0, 0, 0, 0, 0]]
    normalised = prm.dense_step_rewards([[0.5, -1.0, 0.25]], [[1, 3, 4]], [[1, 0, 1]], 6, normalise=True)
    assert normalised.tolist() == [[0, 0.25, 0, 0, 0.125, 0]]  # two weighted steps: each halved
    with pytest.raises(ValueError, match="outside the 6 response tokens"):
        prm.dense_step_rewards([[1.0]], [[6]], [[1]], 6, normalise=False)


# ---- steps -----------------------------------------------------------------------------------------


def test_split_steps_skips_blank_lines_and_records_ends():
    text = "7\n\n11\n  \n13"
    steps = stepwise.split_steps(text)
    assert [(s.text, s.end) for s in steps] == [("7", 1), ("11", 5), ("13", 11)]
    assert [s.text for s in stepwise.split_steps("a;;b;", ";;")] == ["a", "b;"]
    with pytest.raises(ValueError, match="separator"):
        stepwise.split_steps("x", "")


def test_encode_steps_labels_each_separator_like_trl():
    from rlhf_trainer.models import tiny_tokenizer

    tok = tiny_tokenizer()
    prompt = tok("3+4+4=")["input_ids"]
    got = stepwise.encode_steps(tok, prompt, ["7", "11"], "\n", max_prompt_length=16, max_length=32)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert got.ids == prompt + tok("7", add_special_tokens=False)["input_ids"] + newline \
        + tok("11", add_special_tokens=False)["input_ids"] + newline
    assert got.positions == [len(prompt) + 1, len(prompt) + 4]  # "7" "\n" | "1" "1" "\n"
    assert all(got.ids[p] == newline[-1] for p in got.positions)
    assert not got.truncated and got.full_length == len(got.ids)
    cut = stepwise.encode_steps(tok, prompt, ["7", "11"], "\n", max_prompt_length=16, max_length=len(prompt) + 4)
    assert len(cut.ids) == len(prompt) + 4 and cut.positions == got.positions[:1]  # step 2's separator cut off
    assert cut.truncated and cut.full_length == len(got.ids)
    short = stepwise.encode_steps(tok, prompt, ["7"], "\n", max_prompt_length=2, max_length=32)
    assert short.ids[:2] == prompt[-2:] and short.truncated  # the prompt keeps its last tokens


def test_stepwise_rows_are_tokenized_at_startup_with_their_targets():
    from rlhf_trainer.chat import Renderer
    from rlhf_trainer.models import tiny_tokenizer
    from rlhf_trainer.records import StepRecord
    from rlhf_trainer.tokenized import tokenize_records

    tok = tiny_tokenizer()
    records = [StepRecord("3+4+4=", ("7", "11"), (1.0, 0.0), "a"), StepRecord("1+1+1=", ("2", "3"), (1.0, 1.0), "b")]
    renderer = Renderer(tok, "raw")
    full = len(renderer.prompt_ids("3+4+4=")) + 5  # "7" "\n" "1" "1" "\n"
    rows, report = tokenize_records(records, renderer, "steps", max_prompt_length=64, max_length=full)
    assert [r.targets for r in rows] == [(1.0, 0.0), (1.0, 1.0)]
    assert all(r.ids[p] == tok("\n", add_special_tokens=False)["input_ids"][-1] for r in rows for p in r.positions)
    assert report.truncated == 0 and report.longest_row == full
    cut, report = tokenize_records(records, renderer, "steps", max_prompt_length=64, max_length=full - 1)
    assert report.truncated == 1 and cut[0].targets == (1.0,)  # "11\n" no longer fits the first row


@pytest.mark.parametrize("wrong", [0, 1, 4, 6])
def test_binary_search_finds_the_first_wrong_step_in_log_checks(wrong):
    n, calls = 7, []

    def completable(k):
        calls.append(k)
        return k <= wrong  # prefixes holding only correct steps can be completed

    assert stepwise.first_wrong_step(n, completable, response_correct=False) == wrong
    assert len(calls) <= 1 + math.ceil(math.log2(n))
    assert stepwise.labels_from_first_wrong(n, wrong) == [i < wrong for i in range(n)]


def test_binary_search_edge_cases():
    assert stepwise.first_wrong_step(5, lambda k: pytest.fail("no check needed"), response_correct=True) == 5
    assert stepwise.first_wrong_step(5, lambda k: False, response_correct=False) is None  # prompt unsolvable
    assert stepwise.first_wrong_step(1, lambda k: True, response_correct=False) == 0


def test_searches_run_in_lockstep_rounds():
    # Three responses of 8 steps: first wrong steps 2 and 7, and one whose prompt is hopeless.
    wrong = [2, 7, None]
    searches = [stepwise.FirstWrongSearch(8, response_correct=False) for _ in wrong]
    rounds = 0
    while any(s.next_prefix() is not None for s in searches):
        rounds += 1
        for search, w in zip(searches, wrong, strict=True):
            k = search.next_prefix()
            if k is not None:
                search.record(w is not None and k <= w)
    assert [s.result for s in searches] == wrong
    assert rounds <= 1 + 3  # prefix 0, then log2(8) halvings
    with pytest.raises(RuntimeError, match="over"):
        searches[0].record(True)


def test_prefix_text_keeps_the_steps_and_their_separator():
    response = "7\n\n11\n13"
    steps = stepwise.split_steps(response)
    assert [stepwise.prefix_text(response, steps, k, "\n") for k in range(3)] == ["", "7\n", "7\n\n11\n"]


def test_step_weights_zero_the_steps_a_pattern_marks():
    steps = stepwise.split_steps("x = 1\n# add one\ny = x + 1\n  # done")
    assert stepwise.step_weights(steps, r"^\s*#") == [1.0, 0.0, 1.0, 0.0]
    assert stepwise.step_weights(steps, "") == [1.0] * 4


def test_steps_map_to_the_tokens_that_end_them():
    from rlhf_trainer.models import tiny_tokenizer

    tok = tiny_tokenizer()
    response = "7\n11\n13"
    ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ends = stepwise.token_char_ends(tok, ids)
    assert ends[-1] == ends[-2] == len(response)  # EOS adds no text
    steps = stepwise.split_steps(response)
    token_ends = stepwise.step_token_ends([s.end for s in steps], ends)
    # tokens: 7 \n 1 1 \n 1 3 </s>: "7" ends at token 0, "11" at 3, "13" at 6
    assert token_ends == [0, 3, 6]
    assert stepwise.step_token_ends([99], ends) == [len(ids) - 1]


def test_value_head_from_prm_outputs_the_score_before_its_tanh():
    head = torch.nn.Linear(8, 2)
    weight, bias = prm.value_head_from_prm(head.weight.detach(), head.bias.detach())
    hidden = rand(5, 8).float()
    values = hidden @ weight.T + bias
    scores = prm.step_scores(head(hidden).detach())
    assert values.squeeze(-1).tolist() == pytest.approx(torch.atanh(scores).tolist(), rel=1e-4, abs=1e-5)
    no_bias, zero = prm.value_head_from_prm(head.weight.detach(), None)
    assert torch.equal(no_bias, weight) and zero.tolist() == [0.0]
