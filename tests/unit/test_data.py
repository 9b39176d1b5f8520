"""rlhf_trainer.data: conversion for algorithms, synthetic sets, sampler, token helpers (formats: test_formats.py)."""

from __future__ import annotations

import json

import pytest
import torch
from rlhf_trainer import data
from rlhf_trainer.data import PairRecord, PromptRecord, SFTRecord
from rlhf_trainer.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- conversion for algorithms -----------------------------------------------------------------


def test_load_dataset_converts_for_each_kind(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert data.load_dataset(str(pairs), "pairs", kind="prompts") == [PromptRecord("q", None, "pairs.jsonl:1")]
    assert data.load_dataset(str(pairs), "pairs", kind="sft") == [SFTRecord("q", "a", "pairs.jsonl:1")]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q", "answer": "a"}, {"prompt": "r"}])
    with pytest.raises(ConfigError, match="dataset.format: preference training needs pairs"):
        data.load_dataset(str(prompts), "prompts", kind="pairs")
    with pytest.raises(DataError, match="prompts.jsonl:2: sft needs a response"):
        data.load_dataset(str(prompts), "prompts", kind="sft")


@pytest.mark.parametrize(("name", "kind", "cls"), [
    ("arithmetic", "prompts", PromptRecord),
    ("preferences", "pairs", PairRecord),
    ("instructions", "sft", SFTRecord),
])
def test_synthetic_datasets_are_deterministic(name, kind, cls):
    first = data.load_dataset(f"synthetic://{name}", "prompts", kind=kind)
    assert first == data.load_dataset(f"synthetic://{name}", "prompts", kind=kind)
    assert all(isinstance(r, cls) for r in first)
    assert first != data.load_dataset(f"synthetic://{name}?seed=1", "prompts", kind=kind)


def test_synthetic_arithmetic_answers_are_the_sums():
    records = data.load_dataset("synthetic://arithmetic?size=50&max_operand=3", "prompts", kind="prompts")
    assert len(records) == 50
    for r in records:
        a, b = r.prompt.removesuffix("=").split("+")
        assert 0 <= int(a) <= 3 and 0 <= int(b) <= 3 and r.answer == str(int(a) + int(b))


def test_synthetic_preferences_prefer_the_right_sum():
    records = data.load_dataset("synthetic://preferences?size=40", "pairs", kind="pairs")
    for r in records:
        a, b = r.prompt.removesuffix("=").split("+")
        assert r.chosen == str(int(a) + int(b)) != r.rejected
    assert sum(r.rejected.isdigit() for r in records) == 20  # half need the sum, half are words


@pytest.mark.parametrize(("path", "message"), [
    ("synthetic://poems", "unknown synthetic dataset"),
    ("synthetic://arithmetic?difficulty=3", "has no parameter 'difficulty'"),
    ("synthetic://arithmetic?size=x", "must be an integer"),
    ("synthetic://arithmetic?size=0", "at least 1"),
])
def test_bad_synthetic_paths_are_config_errors(path, message):
    with pytest.raises(ConfigError, match=message):
        data.load_dataset(path, "prompts", kind="prompts")


# ---- sampler -----------------------------------------------------------------------------------


def test_sampler_visits_every_index_once_per_epoch_and_crosses_epochs():
    sampler = data.Sampler(10, 4, seed=3)
    drawn = [sampler.next_batch() for _ in range(5)]  # 20 indices = 2 epochs
    flat = [i for batch in drawn for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new order each epoch
    assert sampler.state_dict() == {"epoch": 2, "index": 0, "seed": 3}


def test_sampler_resumes_exactly_from_its_state():
    first = data.Sampler(7, 3, seed=1)
    first.next_batch()
    first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    expected = [first.next_batch() for _ in range(4)]
    resumed = data.Sampler(7, 3, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(4)] == expected
    with pytest.raises(ConfigError, match="hyperparameters.seed"):
        data.Sampler(7, 3, seed=2).load_state_dict(state)


def test_sampler_batch_larger_than_dataset():
    assert sorted(data.Sampler(3, 7, seed=0).next_batch()) == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("n", "world"), [(8, 2), (7, 3), (2, 4)])
def test_shards_cover_the_batch_in_order(n, world):
    items = list(range(n))
    shards = [data.shard(items, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ---- tokenisation --------------------------------------------------------------------------------


def test_pad_left_aligns_prompts_at_the_end():
    enc = data.pad_left([[1, 11], [1, 11, 12, 13]], pad_token_id=0)
    assert enc["input_ids"].tolist() == [[0, 0, 1, 11], [1, 11, 12, 13]]
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_pad_right_masks_the_prompt_and_pads_after_the_response():
    enc = data.pad_right([[1, 11], [1, 11, 12]], [[13, 2], [14, 15, 16]], pad_token_id=0)
    assert enc["input_ids"].tolist() == [[1, 11, 13, 2, 0, 0], [1, 11, 12, 14, 15, 16]]
    assert enc["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_response_mask_stops_after_the_first_eos():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 7, 0], [5, 6, 7, 8, 9]])
    mask, ended = data.response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_response_mask_stops_at_any_of_several_stop_ids():
    # Llama 3 style: <|eot_id|> (9) ends a chat turn, <|end_of_text|> (2) a document
    responses = torch.tensor([[5, 9, 7, 2], [5, 6, 2, 9], [5, 6, 7, 8]])
    mask, ended = data.response_mask(responses, (2, 9))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert data.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_text_datasets_for_the_pretraining_term(tmp_path):
    from rlhf_trainer.data import encode_texts, load_texts
    from rlhf_trainer.models import tiny_tokenizer

    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "hello"}\n\n{"text": "3+4=7"}\n')
    assert load_texts(str(path)) == ["hello", "3+4=7"]
    first = data.synthetic_arithmetic(size=2)[0]
    assert load_texts("synthetic://arithmetic?size=2")[0] == first.prompt + first.answer
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="texts.jsonl:1: field 'text' must be a string"):
        load_texts(str(path))
    tok = tiny_tokenizer()
    enc = encode_texts(tok, ["hello", "3+4=7"], max_length=4)
    lengths = [min(len(tok(t)["input_ids"]) + 1, 4) for t in ("hello", "3+4=7")]
    assert enc["input_ids"].shape == (2, 4) and enc["attention_mask"].sum(-1).tolist() == lengths
    assert lengths[1] == 4  # "<s> 3 + 4 = 7 </s>" cut to its first 4 tokens
    short = encode_texts(tok, ["7"], max_length=10)
    assert short["input_ids"][0].tolist() == tok("7")["input_ids"] + [tok.eos_token_id]
