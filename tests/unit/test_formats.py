"""rlhf_trainer.formats: every file type through `datasets`, every row format, field maps, row-named errors."""

from __future__ import annotations

import json
import re

import datasets
import pytest
from rlhf_trainer import formats
from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.records import PairRecord, PromptRecord, SFTRecord

USER = {"role": "user", "content": "What is 3+4?"}
SYSTEM = {"role": "system", "content": "Be brief."}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# Each file type with a writer; CSV holds strings and numbers only.
WRITERS = {
    "jsonl": lambda p, rows: write_jsonl(p.with_suffix(".jsonl"), rows),
    "json": lambda p, rows: (p.with_suffix(".json").write_text(json.dumps(rows)), p.with_suffix(".json"))[1],
    "parquet": lambda p, rows: (datasets.Dataset.from_list(rows).to_parquet(str(p.with_suffix(".parquet"))),
                                p.with_suffix(".parquet"))[1],
    "csv": lambda p, rows: (datasets.Dataset.from_list(rows).to_csv(str(p.with_suffix(".csv")), index=False),
                            p.with_suffix(".csv"))[1],
    "disk": lambda p, rows: (datasets.Dataset.from_list(rows).save_to_disk(str(p)), p)[1],
    "disk-dict": lambda p, rows: (datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
                                  .save_to_disk(str(p)), p)[1],
}
STRUCTURED = [k for k in WRITERS if k != "csv"]

# (row format, rows, expected records without their source): one table per row format.
ROW_CASES = {
    "prompts": ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": None}],
                [PromptRecord("1+1=", "2"), PromptRecord("2+2=", None)]),
    "query": ([{"query": "1+1="}], [PromptRecord("1+1=")]),
    "prompts-conversational": ([{"prompt": [SYSTEM, USER], "answer": "7"}],
                               [PromptRecord((SYSTEM, USER), "7")]),
    "pairs": ([{"prompt": "q", "chosen": "good", "rejected": "bad"}], [PairRecord("q", "good", "bad")]),
    "pairs-explicit-conversational": (
        [{"prompt": [USER], "chosen": [assistant("7")], "rejected": [assistant("8")]}],
        [PairRecord((USER,), "7", "8")]),
    "pairs-implicit-conversational": (
        [{"chosen": [SYSTEM, USER, assistant("7")], "rejected": [SYSTEM, USER, assistant("8")]}],
        [PairRecord((SYSTEM, USER), "7", "8")]),
    "completion": ([{"prompt": "Say hi.", "completion": "hi"}], [SFTRecord("Say hi.", "hi")]),
    "completion-conversational": ([{"prompt": [USER], "completion": [assistant("7")]}],
                                  [SFTRecord((USER,), "7")]),
    "messages": ([{"messages": [SYSTEM, USER, assistant("7")]}], [SFTRecord((SYSTEM, USER), "7")]),
    "instruction": (
        [{"instruction": "Add.", "input": "1+2", "output": "3", "history": [["Hi", "Hello"]]},
         {"instruction": "Say hi.", "input": None, "output": "hi", "history": None}],
        [SFTRecord(({"role": "user", "content": "Hi"}, assistant("Hello"),
                    {"role": "user", "content": "Add.\n\n1+2"}), "3"),
         SFTRecord(({"role": "user", "content": "Say hi."},), "hi")]),
    "ranked": ([{"prompt": "q", "outputs": ["a", "b", "c"]}],
               [PairRecord("q", "a", "b"), PairRecord("q", "a", "c"), PairRecord("q", "b", "c")]),
    "pair_list": ([{"prompt": "q", "output": ["good", "bad"]}], [PairRecord("q", "good", "bad")]),
}
FORMAT_OF_CASE = {"query": "prompts", "prompts-conversational": "prompts", "pairs-explicit-conversational": "pairs",
                  "pairs-implicit-conversational": "pairs", "completion-conversational": "completion"}
STRING_ONLY = {"prompts", "query", "pairs", "completion"}


def strip_sources(records):
    return [type(r)(**{**r.__dict__, "source": ""}) for r in records]


@pytest.mark.parametrize("case", ROW_CASES)
@pytest.mark.parametrize("file_type", WRITERS)
def test_every_row_format_reads_the_same_from_every_file_type(tmp_path, case, file_type):
    if file_type == "csv" and case not in STRING_ONLY:
        pytest.skip("CSV columns hold no lists")
    rows, expected = ROW_CASES[case]
    path = WRITERS[file_type](tmp_path / "train", rows)
    fmt = FORMAT_OF_CASE.get(case, case)
    records, _ = formats.read_records(path, fmt)
    assert strip_sources(records) == expected
    # `auto` tells the same format from the columns
    auto, detected = formats.read_records(path, "auto")
    assert strip_sources(auto) == expected and detected == fmt


@pytest.mark.parametrize(("file_type", "first_source"), [
    ("jsonl", "train.jsonl:2"),  # a JSON lines file names lines: line 1 is blank
    ("json", "train.json:row 1"), ("parquet", "train.parquet:row 1"), ("csv", "train.csv:row 1"),
    ("disk", "train:row 1"),
])
def test_records_name_their_row(tmp_path, file_type, first_source):
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    path = WRITERS[file_type](tmp_path / "train", rows)
    if file_type == "jsonl":
        path.write_text("\n" + path.read_text())
    records, _ = formats.read_records(path, "prompts")
    assert records[0].source == first_source


@pytest.mark.parametrize(
    ("fmt", "bad_row", "message"),
    [
        ("prompts", {"promt": "x"}, "missing field 'prompt' (or 'query')"),
        ("prompts", {"prompt": 3}, "field 'prompt' must be a non-empty list of messages"),
        ("prompts", {"prompt": "x", "answer": [1]}, "field 'answer' must be a string or a number"),
        ("prompts", {"prompt": [USER, assistant("7")]}, "ends with an assistant turn"),
        ("prompts", {"prompt": [{"role": "user"}]}, "prompt[0] needs string 'role' and 'content'"),
        ("pairs", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ("pairs", {"prompt": "q", "chosen": "a", "rejected": [assistant("b")]}, "must both be strings or both message lists"),
        ("pairs", {"chosen": [USER, assistant("a"), assistant("b")], "rejected": [USER, assistant("c")]},
         "field 'chosen' must hold one assistant message"),
        ("pairs", {"chosen": [assistant("a")], "rejected": [assistant("b")]}, "missing field 'prompt'"),
        ("instruction", {"instruction": "i", "output": "o", "history": [["q"]]}, "field 'history'"),
        ("instruction", {"instruction": "i"}, "missing field 'output'"),
        ("messages", {"messages": [USER]}, "must end with an assistant turn"),
        ("completion", {"prompt": "q", "completion": [USER]}, "must hold one assistant message"),
        ("ranked", {"prompt": "q", "outputs": ["only"]}, "needs at least 2 responses"),
        ("ranked", {"prompt": "q", "outputs": "ab"}, "must be a list of strings"),
        ("pair_list", {"prompt": "q", "output": ["a", "b", "c"]}, "must be [chosen, rejected]"),
    ],
)
def test_a_bad_row_names_file_and_line(fmt, bad_row, message):
    with pytest.raises(DataError, match=rf"^train\.jsonl:3: .*{re.escape(message)}"):
        formats.parse_row(bad_row, fmt, "train.jsonl:3")


def test_a_bad_row_in_a_parquet_file_names_its_row(tmp_path):
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "x", "rejected": None}]
    path = WRITERS["parquet"](tmp_path / "train", rows)
    with pytest.raises(DataError, match=r"^train\.parquet:row 2: missing field 'rejected'"):
        formats.read_records(path, "pairs")


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt": "a"}', '', '{"prompt": "b"'], r"^train\.jsonl:3: invalid JSON"),
    (['{"prompt": "a"}', '[1, 2]'], r"^train\.jsonl:2: expected a JSON object"),
    # (datasets reads this file without the blank line, and fails with it)
    (['{"prompt": "a", "answer": 4}', '', '{"prompt": "b"}', '{"prompt": "c", "answer": "x"}'],
     r"^train\.jsonl:4: field 'answer' is a string here but a number at train\.jsonl:1"),
])
def test_a_file_datasets_cannot_read_is_diagnosed_by_line(tmp_path, lines, message):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        formats.read_records(path, "prompts")


def test_an_invalid_json_array_names_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=r"^train\.json:3: invalid JSON"):
        formats.read_records(path, "prompts")


@pytest.mark.parametrize(("name", "make", "message"), [
    ("nope.jsonl", None, "dataset file not found"),
    ("empty.jsonl", lambda p: p.write_text("\n"), "has no rows"),
    ("train.txt", lambda p: p.write_text("x"), "unknown dataset file type"),
    ("folder", lambda p: p.mkdir(), "not a dataset folder written by save_to_disk"),
])
def test_unreadable_sources_are_data_errors_naming_the_path(tmp_path, name, make, message):
    path = tmp_path / name
    if make:
        make(path)
    with pytest.raises(DataError, match=message):
        formats.read_records(path, "prompts")


def test_a_dataset_dict_without_a_train_split_is_named(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "a"}])
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"splits \['test'\], none named 'train'"):
        formats.read_records(tmp_path / "d", "prompts")


def test_field_map_renames_columns_before_the_format_is_told(tmp_path):
    rows = [{"question": "1+1=", "solution": "2", "prompt": "ignored"}]
    path = WRITERS["parquet"](tmp_path / "gsm", rows)
    records, fmt = formats.read_records(path, "auto", fields={"prompt": "question", "answer": "solution"})
    assert fmt == "prompts" and strip_sources(records) == [PromptRecord("1+1=", "2")]


def test_field_map_naming_a_missing_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match=r"dataset\.fields\.prompt: column 'text' is not in train\.jsonl "
                                        r"\(columns: question\)"):
        formats.read_records(path, "auto", fields={"prompt": "text"})


def test_the_field_names_are_the_contracts():
    from rlhf_contract.config import DatasetFields

    assert formats.FIELD_NAMES == tuple(DatasetFields().__dict__)
    assert DatasetFields(prompt="question", answer="solution").mapping() == {"prompt": "question", "answer": "solution"}


def test_auto_names_the_columns_it_could_not_place(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": 1}])
    with pytest.raises(DataError, match=r"cannot tell the dataset format from the columns \['label', 'text'\]"):
        formats.read_records(path, "auto")


def test_an_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset.format: unknown format 'tsv'"):
        formats.parse_row({"prompt": "x"}, "tsv", "t.jsonl:1")


def test_compressed_json_lines_are_read(tmp_path):
    import gzip

    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"prompt": "a"}\n{"prompt": "b"}\n')
    records, _ = formats.read_records(path, "prompts")
    assert [r.prompt for r in records] == ["a", "b"] and records[1].source == "train.jsonl.gz:row 2"


def test_reading_leaves_no_datasets_cache_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}])
    formats.read_records(path, "prompts")
    assert not (tmp_path / "hf-cache").exists() or not any((tmp_path / "hf-cache").rglob("*.arrow"))
