"""rlhf_trainer.samples: when samples are due, what a row holds, the file and the info labels."""

import json

import pytest
import torch
from rlhf_trainer import samples


@pytest.mark.parametrize(("step", "interval", "due"), [
    (10, 10, True), (20, 10, True), (15, 10, False), (1, 1, True), (5, 0, False),
])
def test_due(step, interval, due):
    assert samples.due(step, interval) is due


def test_pick_sums_kl_over_the_response_and_counts_its_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    kl = torch.tensor([[0.5, -0.25, 9.0], [0.1, 0.1, 0.1], [1.0, 0.0, 0.0]])  # 9.0 sits on padding
    picked = samples.pick(7, ["a", "b", "c"], ["x", "y", "z"], torch.tensor([1.0, 0.0, 0.5]), kl, mask,
                          torch.tensor([False, True, False]), count=2)
    assert [s.prompt for s in picked] == ["a", "b"]
    assert picked[0] == samples.Sample(7, "a", "x", 1.0, 0.25, 2, False)
    assert picked[1].kl == pytest.approx(0.3) and picked[1].length == 3 and picked[1].truncated is True


def test_pick_without_kl_and_more_asked_than_rows():
    picked = samples.pick(1, ["a"], ["x"], torch.tensor([0.0]), None, torch.tensor([[1]]), torch.tensor([False]), 4)
    assert len(picked) == 1 and picked[0].kl is None


def test_write_appends_json_lines_with_null_for_non_finite(tmp_path):
    path = tmp_path / "samples" / "actor-0.jsonl"
    samples.write(path, [samples.Sample(1, "p", "r", float("nan"), float("inf"), 1, False)])
    samples.write(path, [samples.Sample(2, "p", "r", 1.0, 0.5, 1, True)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["reward"] is None and rows[0]["kl"] is None
    assert rows[1] == {"step": 2, "prompt": "p", "response": "r", "reward": 1.0, "kl": 0.5, "length": 1,
                       "truncated": True}


def test_info_labels_are_strings_and_cut_long_text():
    labels = samples.info_labels(samples.Sample(3, "q" * 500, "a", 0.123456, None, 4, True))
    assert labels == {"step": "3", "prompt": "q" * samples.INFO_TEXT, "response": "a", "reward": "0.1235",
                      "length": "4", "truncated": "true"}
