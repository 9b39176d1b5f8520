"""rlhf_trainer.models: tiny models and tokenizer build, generate, and round-trip through save/load."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from rlhf_trainer import models
from rlhf_trainer.data import pad_left
from rlhf_trainer.errors import ConfigError


def encode_prompts(tok, prompts, max_length):
    return pad_left([tok(p)["input_ids"][-max_length:] for p in prompts], tok.pad_token_id)


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny://llama")


def test_tiny_tokenizer_is_small_and_encodes_answers_as_single_tokens(tok):
    assert 100 < len(tok) <= 256
    assert tok.padding_side == "left"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    for digit in "0123456789":
        assert tok(digit, add_special_tokens=False)["input_ids"] != []
        assert len(tok(digit, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("3+4=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 5


def test_tiny_tokenizer_round_trips_ascii_and_maps_the_rest_to_unk(tok):
    text = "Hello world! tabs\tand\nnewlines 123 {x: [y]}"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    ids = tok("w\u00f6rld", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in ids


def test_numbers_are_runs_of_single_digit_tokens(tok):
    assert tok.convert_ids_to_tokens(tok(" 128", add_special_tokens=False)["input_ids"]) == ["\u0120", "1", "2", "8"]


def test_bpe_merges_are_deterministic_with_lexicographic_ties():
    import collections

    words = collections.Counter({"ab": 2, "cd": 2, "abcd": 1})
    # "ab" and "cd" both count 3; the smaller pair wins the tie.
    assert models.learn_bpe_merges(words, 3) == [("a", "b"), ("c", "d"), ("ab", "cd")]


def test_tokenizer_is_identical_in_another_process(tok):
    # Actor and reference run in different processes and must agree on every token id.
    code = "from rlhf_trainer import models; print(models._tiny_tokenizer_json())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == models._tiny_tokenizer_json()


@pytest.mark.parametrize("path", ["tiny://llama", "tiny://qwen2"])
def test_same_seed_same_weights_other_seed_differs(path):
    a, b, c = (models.load_policy(path, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_building_does_not_touch_the_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    models.load_policy("tiny://llama", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("path", ["tiny://llama", "tiny://qwen2"])
def test_tiny_policy_generates(path, tok):
    policy = models.load_policy(path, seed=0).eval()
    enc = encode_prompts(tok, ["3+4=", "### Instruction:\nRepeat the word.\n"], max_length=32)
    out = policy.generate(**enc, do_sample=True, max_new_tokens=5, min_new_tokens=5,
                          pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    assert torch.equal(out[:, : enc["input_ids"].shape[1]], enc["input_ids"])
    assert int(out.max()) < len(tok)


def test_value_model_gives_one_value_per_token_and_trains(tok):
    critic = models.load_value_model("tiny://llama", seed=0)
    enc = encode_prompts(tok, ["1+1=", "2+2=2"], max_length=16)
    values = critic(enc["input_ids"], enc["attention_mask"])
    assert values.shape == enc["input_ids"].shape
    # the backbone is the policy's initialisation
    policy = models.load_policy("tiny://llama", seed=0)
    assert torch.equal(critic.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    values.pow(2).mean().backward()
    assert critic.value_head.weight.grad is not None
    assert critic.backbone.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_reward_model_scores_each_row_at_its_last_real_token(tok):
    rm = models.load_reward_model("tiny://llama", seed=0).eval()
    enc = encode_prompts(tok, ["1+1=2", "3+4=7 and more"], max_length=16)
    with torch.no_grad():
        batched = rm(**enc).logits
        alone = rm(**encode_prompts(tok, ["1+1=2"], max_length=16)).logits
    assert batched.shape == (2, 1)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path, tok):
    policy = models.load_policy("tiny://qwen2", seed=3)
    folder = models.save_pretrained(policy, tok, tmp_path / "export")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = models.load_policy(str(folder), seed=99)  # the seed only matters for tiny://
    assert type(loaded) is type(policy)
    assert all(torch.equal(x, y) for x, y in zip(policy.parameters(), loaded.parameters(), strict=True))
    loaded_tok = models.load_tokenizer(str(folder))
    assert loaded_tok("3+4=")["input_ids"] == tok("3+4=")["input_ids"]
    assert loaded_tok.padding_side == "left"
    # a policy folder initialises a critic and a reward model (new head, same backbone)
    critic = models.load_value_model(str(folder), seed=0)
    assert torch.equal(critic.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    rm = models.load_reward_model(str(folder), seed=0)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id


def test_save_with_an_explicit_state_dict(tmp_path, tok):
    policy = models.load_policy("tiny://llama", seed=0)
    state = {k: torch.zeros_like(v) for k, v in policy.state_dict().items()}
    models.save_pretrained(policy, tok, tmp_path, state_dict=state)
    loaded = models.load_policy(str(tmp_path), seed=0)
    assert float(loaded.model.embed_tokens.weight.detach().abs().sum()) == 0.0


def test_tied_weights_in_an_explicit_state_dict_are_saved_once(tmp_path, tok):
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    clones = {k: v.clone() for k, v in model.state_dict().items()}  # as a consolidated ZeRO-3 state dict
    assert "lm_head.weight" in clones
    models.save_pretrained(model, tok, tmp_path, state_dict=clones)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    loaded = models.load_policy(str(tmp_path), seed=0)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("path", ["tiny://gpt5", "meta-llama/Llama-3-8B", "/nonexistent/model"])
def test_unknown_or_remote_paths_are_config_errors(path):
    with pytest.raises(ConfigError, match="model path"):
        models.load_policy(path, seed=0)


def test_a_critic_from_a_reward_model_starts_with_its_scores(tmp_path, tok):
    rm = models.load_reward_model("tiny://llama", seed=4).eval()
    folder = models.save_pretrained(rm, tok, tmp_path / "rm")
    assert models.is_sequence_classifier(str(folder)) and not models.is_sequence_classifier("tiny://llama")
    critic = models.load_value_model(str(folder), seed=0, init="reward").eval()
    assert torch.equal(critic.value_head.weight, rm.score.weight)
    enc = encode_prompts(tok, ["1+1=2", "3+4=7 and more"], max_length=16)
    with torch.no_grad():
        values = critic(enc["input_ids"], enc["attention_mask"])
        scores = rm(**enc).logits[:, 0]
    # left-padded rows end at the last column: the value there is the reward model's score
    torch.testing.assert_close(values[:, -1], scores, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown critic init"):
        models.load_value_model("tiny://llama", seed=0, init="random")
