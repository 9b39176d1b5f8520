"""rlhf_trainer.stackexchange: the seed StackLLaMA's answer score and pairing rule, and the shipped data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from rlhf_trainer import stackexchange as se
from rlhf_trainer.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "crds" / "examples" / "data" / "stackqa.jsonl"


@pytest.mark.parametrize(("upvotes", "accepted", "score"), [
    pytest.param(0, False, 0, id="no-votes"),
    pytest.param(1, False, 1, id="one-vote"),
    pytest.param(2, False, 2, id="log2-3-is-1.58-rounds-up"),
    pytest.param(4, False, 2, id="log2-5-is-2.32-rounds-down"),
    pytest.param(5, False, 3, id="log2-6-is-2.58"),
    pytest.param(63, False, 6, id="log2-64"),
    pytest.param(63, True, 7, id="accepted-adds-one"),
    pytest.param(0, True, 1, id="accepted-without-votes"),
    pytest.param(-1, False, -1, id="negative-votes-score-minus-one"),
    pytest.param(-30, True, 0, id="negative-but-accepted"),
])
def test_answer_score(upvotes, accepted, score):
    assert se.answer_score(upvotes, accepted) == score
    if upvotes >= 0:
        assert score == round(math.log2(1 + upvotes)) + accepted


def thread(*answers, id=1):
    return se.Thread(id, "Q?", tuple(se.Answer(t, u, a) for t, u, a in answers))


def test_pairs_put_the_higher_score_first_and_skip_equal_scores():
    t = thread(("a", 25, True), ("b", 8, False), ("c", 7, False), ("d", -2, False))  # scores 6, 3, 3, -1
    got = {(c.text, r.text) for c, r in se.pairs(t)}
    assert got == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")}  # b, c tie: no pair


def test_at_most_ten_pairs_per_question_drawn_with_the_seed():
    t = thread(*[(f"a{i}", 2 ** i - 1, False) for i in range(7)])  # scores 0..6: 21 pairs
    first, again, other = se.pairs(t, seed=0), se.pairs(t, seed=0), se.pairs(t, seed=1)
    assert len(first) == se.MAX_PAIRS_PER_QUESTION and first == again and first != other
    assert all(c.score > r.score for c, r in first)


def test_best_answer_is_the_highest_score_then_the_most_votes():
    assert se.best_answer(thread(("x", 8, False), ("y", 7, True))).text == "y"  # 3 vs 4 (accepted)
    assert se.best_answer(thread(("x", 5, False), ("y", 6, False))).text == "y"  # both 3: more votes
    assert se.best_answer(thread()) is None


@pytest.mark.parametrize(("row", "message"), [
    pytest.param([], "expected a JSON object", id="not-an-object"),
    pytest.param({"id": 1, "question": "q"}, "field 'answers' must be a list", id="no-answers"),
    pytest.param({"id": 1, "question": "q", "answers": [{"text": "a", "upvotes": "3"}]},
                 "answers[0]: field 'upvotes' must be an integer", id="votes-as-text"),
    pytest.param({"id": 1, "question": "q", "answers": [{"text": "a", "upvotes": True}]},
                 "answers[0]: field 'upvotes' must be an integer", id="votes-as-boolean"),
    pytest.param({"id": 1, "question": "q", "answers": [{"text": "a", "upvotes": 1, "accepted": "yes"}]},
                 "field 'accepted' must be true or false", id="accepted-not-boolean"),
    pytest.param({"id": 1, "question": "q", "answers": [{"text": "a", "upvotes": 1, "accepted": True},
                                                        {"text": "b", "upvotes": 1, "accepted": True}]},
                 "more than one accepted answer", id="two-accepted"),
])
def test_bad_rows_name_the_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "stack.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n")  # a blank first line: the row is line 2
    with pytest.raises(DataError, match=re.escape(message)) as raised:
        se.read_threads(path)
    assert str(raised.value).startswith("stack.jsonl:2")


def test_the_shipped_data_gives_sft_rows_and_pairs_by_the_rule(tmp_path):
    threads = se.read_threads(SHIPPED)
    assert 30 <= len(threads) <= 60 and all(len(t.answers) >= 3 for t in threads)
    rows = se.convert(threads)
    assert len(rows["sft"]) == len(threads)
    assert all(r["prompt"].startswith("Question: ") and r["prompt"].endswith("\n\nAnswer: ") for r in rows["sft"])
    per_question: dict[str, int] = {}
    for pair in rows["pairs"]:
        per_question[pair["prompt"]] = per_question.get(pair["prompt"], 0) + 1
        assert pair["chosen"] != pair["rejected"]
    assert max(per_question.values()) == se.MAX_PAIRS_PER_QUESTION  # the 5-answer question is capped
    paths = se.write(rows, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["pairs.jsonl", "sft.jsonl"]
    assert len(paths["pairs"].read_text().splitlines()) == len(rows["pairs"])


def test_main_writes_the_files_and_a_manifest_with_local_paths(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("dataset:\n  path: /data/stackqa/sft.jsonl\nother: /data/elsewhere/x\n")
    assert se.main([str(SHIPPED), str(tmp_path / "out"), "--manifest", str(manifest)]) == 0
    local = (tmp_path / "out" / "m.yaml").read_text()
    assert f"path: {(tmp_path / 'out').resolve()}/sft.jsonl" in local and "/data/elsewhere/x" in local
    assert "49 questions" in capsys.readouterr().out
