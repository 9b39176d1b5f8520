"""rlhf_trainer.lora: adapters that start as a no-op, a base model that stays the initial policy with
adapters off, exports that fold them in (or keep them apart), and a reference served by the actor."""

from __future__ import annotations

import pytest
import torch
from rlhf_contract.config import LoraConfig
from rlhf_trainer import lora, models
from rlhf_trainer.data import pad_left
from rlhf_trainer.roles import ReferenceService


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny://llama")


@pytest.fixture(scope="module")
def batch(tok):
    return pad_left([tok(p)["input_ids"] for p in ("3+4=7", "Repeat the word. apple")], tok.pad_token_id)


def perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_target_modules():
    assert lora.target_modules("all-linear") == "all-linear"
    assert lora.target_modules("q_proj, v_proj,") == ["q_proj", "v_proj"]


def test_adapters_start_as_a_no_op_and_only_they_train(batch):
    base = models.load_policy("tiny://llama", seed=0).eval()
    expected = logits(base, batch)
    model = lora.with_lora(models.load_policy("tiny://llama", seed=0), LoraConfig(rank=4), classifier=False).eval()
    torch.testing.assert_close(logits(model, batch), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) < 0.2 * sum(
        p.numel() for p in model.parameters())


def test_adapters_off_is_the_initial_policy(batch):
    expected = logits(models.load_policy("tiny://llama", seed=0).eval(), batch)
    model = lora.with_lora(models.load_policy("tiny://llama", seed=0), LoraConfig(rank=4), classifier=False).eval()
    perturb_adapters(model)
    assert not torch.allclose(logits(model, batch), expected, atol=1e-3)
    with lora.adapters_off(model):
        torch.testing.assert_close(logits(model, batch), expected)


def test_a_colocated_reference_serves_the_base_and_leaves_the_actor_training(batch):
    model = lora.with_lora(models.load_policy("tiny://llama", seed=0), LoraConfig(rank=4), classifier=False)
    perturb_adapters(model)
    model.train()
    reference = ReferenceService(model, 1.0, chunk_size=8, adapters_off=True)
    copy = ReferenceService(models.load_policy("tiny://llama", seed=0), 1.0, chunk_size=8)
    got = reference.handle("logprobs", dict(batch), {})[0]["logprobs"]
    torch.testing.assert_close(got, copy.handle("logprobs", dict(batch), {})[0]["logprobs"])
    assert model.training  # the actor's mode is restored


def test_merged_export_is_a_plain_model_computing_what_the_adapters_did(tmp_path, batch):
    cfg = LoraConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj")
    trained = lora.with_lora(models.load_policy("tiny://llama", seed=0), cfg, classifier=False).eval()
    perturb_adapters(trained)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    merged = lora.write_export(state, cfg, lambda: models.load_policy("tiny://llama", seed=0), classifier=False,
                               folder=tmp_path)
    assert not lora.is_lora(merged) and not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged.eval(), batch), logits(trained, batch), atol=1e-4, rtol=1e-4)


def test_merged_export_of_a_quantized_base_folds_the_adapters_into_the_unquantized_base(tmp_path, batch):
    # A base that trained quantized has packed uint8 weights and quantization constants in its state;
    # the export must ignore them and fold the adapters into a fresh full-precision base.
    cfg = LoraConfig(rank=4, quantization="4bit")
    trained = lora.with_lora(models.load_policy("tiny://llama", seed=0), cfg, classifier=False).eval()
    perturb_adapters(trained)
    state = {k: (v.clone() if "lora_" in k else torch.zeros(v.numel() // 2 + 1, dtype=torch.uint8))
             for k, v in trained.state_dict().items()}
    state.update({k.replace(".weight", ".weight.absmax"): torch.ones(3) for k in list(state) if "base_layer" in k})
    merged = lora.write_export(state, cfg, lambda: models.load_policy("tiny://llama", seed=0), classifier=False,
                               folder=tmp_path)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(logits(merged.eval(), batch), logits(trained, batch), atol=1e-4, rtol=1e-4)


def test_adapter_export_writes_peft_files(tmp_path):
    cfg = LoraConfig(rank=2, export="adapter")
    trained = lora.with_lora(models.load_reward_model("tiny://llama", seed=0), cfg, classifier=True)
    assert any("score" in n and p.requires_grad for n, p in trained.named_parameters())  # the head trains too
    out = lora.write_export(trained.state_dict(), cfg, lambda: models.load_reward_model("tiny://llama", seed=0),
                            classifier=True, folder=tmp_path)
    assert out is None
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()


def test_a_state_that_does_not_fit_the_adapters_is_refused(tmp_path):
    cfg = LoraConfig(rank=4)
    other = lora.with_lora(models.load_policy("tiny://llama", seed=0), LoraConfig(rank=4, target_modules="q_proj"),
                           classifier=False).state_dict()
    with pytest.raises(RuntimeError, match="does not fit the adapters"):
        lora.write_export(other, cfg, lambda: models.load_policy("tiny://llama", seed=0), classifier=False,
                          folder=tmp_path)
