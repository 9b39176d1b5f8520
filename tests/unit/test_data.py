"""rlhf_trainer.data: JSONL formats, file:line errors, synthetic sets, sampler, token helpers."""

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


class FakeTokenizer:
    """Whitespace tokenizer with the HF call shape the helpers use: ids are word lengths + 10."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + len(w) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


# ---- formats ----------------------------------------------------------------------------------


def test_prompts_format_with_optional_answer(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}, "", {"prompt": "2+2=", "answer": 4}])
    assert data.read_jsonl(path, "prompts") == [
        PromptRecord("1+1=", None, "p.jsonl:1"),
        PromptRecord("2+2=", "4", "p.jsonl:3"),
    ]


def test_pairs_and_pair_list_formats(tmp_path):
    pairs = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    plist = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "output": ["good", "bad"]}])
    assert data.read_jsonl(pairs, "pairs") == [PairRecord("q", "good", "bad", "a.jsonl:1")]
    assert data.read_jsonl(plist, "pair_list") == [PairRecord("q", "good", "bad", "b.jsonl:1")]


def test_ranked_expands_into_every_better_worse_pair(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "outputs": ["a", "b", "c"]}])
    got = [(r.chosen, r.rejected) for r in data.read_jsonl(path, "ranked")]
    assert got == [("a", "b"), ("a", "c"), ("b", "c")]


def test_instruction_format_renders_input_and_history(tmp_path):
    row = {"instruction": "Add.", "input": "1+2", "output": "3", "history": [["Hi", "Hello"]]}
    path = write_jsonl(tmp_path / "i.jsonl", [row, {"instruction": "Say hi.", "output": "hi"}])
    first, second = data.read_jsonl(path, "instruction")
    assert first.prompt == ("### Instruction:\nHi\n### Response:\nHello\n"
                            "### Instruction:\nAdd.\n### Input:\n1+2\n### Response:\n")
    assert first.response == "3"
    assert second.prompt == "### Instruction:\nSay hi.\n### Response:\n"


@pytest.mark.parametrize(
    ("fmt", "bad_row", "message"),
    [
        ("prompts", '{"prompt": "x"', "invalid JSON"),
        ("prompts", "[1, 2]", "expected a JSON object"),
        ("prompts", {"promt": "x"}, "missing field 'prompt'"),
        ("prompts", {"prompt": 3}, "field 'prompt' must be a string"),
        ("prompts", {"prompt": "x", "answer": [1]}, "field 'answer' must be a string or a number"),
        ("pairs", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ("instruction", {"instruction": "i", "output": "o", "history": [["q"]]}, "field 'history'"),
        ("instruction", {"instruction": "i"}, "missing field 'output'"),
        ("ranked", {"prompt": "q", "outputs": ["only"]}, "needs at least 2 responses"),
        ("ranked", {"prompt": "q", "outputs": "ab"}, "must be a list of strings"),
        ("pair_list", {"prompt": "q", "output": ["a", "b", "c"]}, "must be [chosen, rejected]"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, fmt, bad_row, message):
    good = {
        "prompts": {"prompt": "x"},
        "pairs": {"prompt": "q", "chosen": "a", "rejected": "b"},
        "instruction": {"instruction": "i", "output": "o"},
        "ranked": {"prompt": "q", "outputs": ["a", "b"]},
        "pair_list": {"prompt": "q", "output": ["a", "b"]},
    }[fmt]
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad_row, good])
    with pytest.raises(DataError, match=rf"^train\.jsonl:3: .*{message.replace('[', '.').replace(']', '.')}"):
        data.read_jsonl(path, fmt)


def test_missing_or_empty_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.read_jsonl(tmp_path / "nope.jsonl", "prompts")
    with pytest.raises(DataError, match="no rows"):
        data.read_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]), "prompts")


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


def test_encode_prompts_left_pads_and_keeps_the_end_of_long_prompts():
    enc = data.encode_prompts(FakeTokenizer(), ["a bb", "a bb ccc dddd"], max_length=3)
    assert enc["input_ids"].tolist() == [[1, 11, 12], [12, 13, 14]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    enc = data.encode_prompts(FakeTokenizer(), ["a", "a bb ccc"], max_length=8)
    assert enc["input_ids"].tolist() == [[0, 0, 1, 11], [1, 11, 12, 13]]
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_encode_prompt_responses_masks_the_prompt_and_appends_eos():
    enc = data.encode_prompt_responses(FakeTokenizer(), ["a", "a bb"], ["ccc", "dddd eeeee ffffff"],
                                       max_prompt_length=8, max_response_length=3)
    # the second response is cut to 3 tokens, losing its EOS
    assert enc["input_ids"].tolist() == [[1, 11, 13, 2, 0, 0], [1, 11, 12, 14, 15, 16]]
    assert enc["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_response_mask_stops_after_the_first_eos():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 7, 0], [5, 6, 7, 8, 9]])
    mask, ended = data.response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
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
