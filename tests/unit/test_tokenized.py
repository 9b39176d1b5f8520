"""rlhf_trainer.tokenized: lengths for offline algorithms, truncation counted, identical pairs dropped,
the startup refusal above a share — tables, a property test over generated pairs, and the users'
long-pairs case (tests/integration/cases/long-pairs/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rlhf_trainer import models
from rlhf_trainer.chat import Renderer
from rlhf_trainer.data import load_dataset
from rlhf_trainer.records import PairRecord, PromptRecord, SFTRecord
from rlhf_trainer.tokenized import LengthReport, tokenize_records, truncate_row, truncation_error

LONG_PAIRS = Path(__file__).parents[1] / "integration" / "cases" / "long-pairs" / "pairs.jsonl"
EOS = 0


class CharRenderer:
    """One token per character (its code point), EOS = 0 after each response: lengths are obvious."""

    def prompt_ids(self, prompt, where=""):
        return [ord(c) for c in prompt]

    def response_ids(self, prompt, response, where=""):
        return [ord(c) for c in response] + [EOS]


@pytest.mark.parametrize(("prompt", "response", "max_prompt", "max_length", "expected"), [
    pytest.param(3, 4, 8, 16, (3, 4, False), id="fits"),
    pytest.param(10, 4, 8, 16, (8, 4, True), id="prompt-keeps-its-end"),
    pytest.param(3, 20, 8, 16, (3, 13, True), id="response-keeps-its-start"),
    pytest.param(20, 20, 64, 16, (15, 1, True), id="prompt-leaves-one-response-token"),
    pytest.param(3, 13, 8, 16, (3, 13, False), id="exactly-max-length"),
])
def test_truncate_row(prompt, response, max_prompt, max_length, expected):
    p_in, r_in = list(range(100, 100 + prompt)), list(range(200, 200 + response))
    p, r, cut = truncate_row(p_in, r_in, max_prompt_length=max_prompt, max_length=max_length)
    assert (len(p), len(r), cut) == expected
    assert list(p) == p_in[len(p_in) - len(p):] and list(r) == r_in[:len(r)]


def test_pairs_identical_after_truncation_are_dropped_and_counted():
    records = [PairRecord("q", "same start, good end", "same start, bad end", "t:1"),
               PairRecord("q", "short", "other", "t:2")]
    rows, report = tokenize_records(records, CharRenderer(), "pairs", max_prompt_length=8, max_length=12)
    assert [r.source for r in rows] == ["t:2"]
    assert report == LengthReport(rows=2, truncated=1, dropped=1, longest_prompt=1, longest_row=22,
                                  prompts_truncated=0)


def test_sft_and_prompt_rows_count_their_truncation():
    sft, report = tokenize_records([SFTRecord("abc", "defgh"), SFTRecord("a", "b")], CharRenderer(), "sft",
                                   max_prompt_length=2, max_length=5)
    assert [(r.prompt, r.response, r.truncated) for r in sft] == [((98, 99), (100, 101, 102), True),
                                                                  ((97,), (98, EOS), False)]
    assert (report.truncated, report.prompts_truncated) == (1, 1)
    prompts, report = tokenize_records([PromptRecord("abcd", "7"), PromptRecord("ab")], CharRenderer(), "prompts",
                                       max_prompt_length=3, max_length=5)
    assert [(r.ids, r.truncated, r.answer) for r in prompts] == [((98, 99, 100), True, "7"), ((97, 98), False, None)]
    assert report.truncated == 1


def test_no_error_within_the_share():
    report = LengthReport(rows=10, truncated=1, dropped=0, longest_prompt=4, longest_row=40, prompts_truncated=0)
    assert truncation_error(report, "d.jsonl", "pairs", max_prompt_length=8, max_length=32, max_share=0.1) is None


def test_the_error_names_dataset_share_and_the_settings_to_raise():
    report = LengthReport(rows=4, truncated=3, dropped=1, longest_prompt=70, longest_row=90, prompts_truncated=1)
    message = truncation_error(report, "/data/pairs.jsonl", "pairs", max_prompt_length=64, max_length=80,
                               max_share=0.1)
    assert message == ("dataset /data/pairs.jsonl: 3 of 4 rows (75%) would be truncated, more than "
                       "hyperparameters.maxTruncatedShare = 0.1; raise hyperparameters.maxPromptLength (now 64; "
                       "the longest prompt has 70 tokens) and hyperparameters.maxLength (now 80; the longest "
                       "prompt + response has 90 tokens), or raise maxTruncatedShare to train on truncated rows")


def test_prompt_datasets_name_only_max_prompt_length():
    report = LengthReport(rows=2, truncated=2, dropped=0, longest_prompt=600, longest_row=0, prompts_truncated=2)
    message = truncation_error(report, "p.jsonl", "prompts", max_prompt_length=512, max_length=1024, max_share=0.5)
    assert "maxPromptLength (now 512; the longest prompt has 600 tokens)" in message and "maxLength" not in \
        message.replace("maxTruncatedShare", "")


# ---- property: every generated pair ---------------------------------------------------------------

texts = st.text(alphabet="abcde ", min_size=0, max_size=30)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(st.text(alphabet="xyz", min_size=1, max_size=20), texts, texts), min_size=1,
                      max_size=8),
       max_prompt_length=st.integers(1, 24), max_length=st.integers(2, 48))
def test_lengths_hold_for_any_pairs(pairs, max_prompt_length, max_length):
    records = [PairRecord(p, c, r, f"t:{i}") for i, (p, c, r) in enumerate(pairs)]
    rows, report = tokenize_records(records, CharRenderer(), "pairs", max_prompt_length=max_prompt_length,
                                    max_length=max_length)
    assert report.rows == len(records) == len(rows) + report.dropped
    assert 0 <= report.truncated <= report.rows
    by_source = {r.source: r for r in rows}
    for i, (p, c, r) in enumerate(pairs):
        full_p, full_c, full_r = [ord(x) for x in p], [ord(x) for x in c] + [EOS], [ord(x) for x in r] + [EOS]
        cut_p, cut_c, _ = truncate_row(full_p, full_c, max_prompt_length=max_prompt_length, max_length=max_length)
        _, cut_r, _ = truncate_row(full_p, full_r, max_prompt_length=max_prompt_length, max_length=max_length)
        row = by_source.get(f"t:{i}")
        # kept exactly when the two responses still differ after truncation
        assert (row is None) == (cut_c == cut_r)
        if row is None:
            continue
        for response, full in ((row.chosen, full_c), (row.rejected, full_r)):
            assert len(row.prompt) + len(response) <= max_length
            assert list(response) == full[:len(response)] and len(response) >= 1
        assert list(row.prompt) == full_p[len(full_p) - len(row.prompt):] and len(row.prompt) <= max_prompt_length
        untouched = len(row.prompt) == len(full_p) and row.chosen == tuple(full_c) and row.rejected == tuple(full_r)
        assert row.truncated == (not untouched)


# ---- the users' case: DPO pairs of 20-25 words ----------------------------------------------------


def test_long_pairs_train_at_their_real_length_with_the_defaults():
    from rlhf_contract.config import Hyperparameters

    hp = Hyperparameters()
    records = load_dataset(str(LONG_PAIRS), "pairs", kind="pairs")
    renderer = Renderer(models.load_tokenizer("tiny://llama"), "auto")
    rows, report = tokenize_records(records, renderer, "pairs", max_prompt_length=hp.max_prompt_length,
                                    max_length=hp.max_length)
    assert (report.truncated, report.dropped, len(rows)) == (0, 0, 2)
    assert all(r.chosen[-1] == r.rejected[-1] == renderer.eos_id for r in rows)  # both keep their EOS
    assert all(len(r.chosen) > 17 and r.chosen != r.rejected for r in rows)


def test_long_pairs_cut_to_the_old_17_response_tokens_are_dropped_and_refused():
    records = load_dataset(str(LONG_PAIRS), "pairs", kind="pairs")
    renderer = Renderer(models.load_tokenizer("tiny://llama"), "auto")
    prompt = max(len(renderer.prompt_ids(r.prompt)) for r in records)
    rows, report = tokenize_records(records, renderer, "pairs", max_prompt_length=64, max_length=prompt + 17)
    assert rows == [] and report.dropped == 2 and report.truncated == 2
    message = truncation_error(report, "pairs.jsonl", "pairs", max_prompt_length=64, max_length=prompt + 17,
                               max_share=0.1)
    assert message.startswith("dataset pairs.jsonl: 2 of 2 rows (100%) would be truncated")
    assert "raise hyperparameters.maxLength" in message
