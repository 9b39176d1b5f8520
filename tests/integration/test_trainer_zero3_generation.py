"""Two ZeRO-3 actor ranks whose samples stop at different lengths still finish (no generation deadlock).

Under ZeRO-3 every forward gathers parameters with a collective of the actor's world; a rank whose
responses all ended would stop calling forward while the other still samples, and both would wait
forever. The model here is built so the lengths differ for sure: one layer whose outputs are
zeroed (o_proj, down_proj = 0), so the logits depend on the current token only (a bigram table),
with "A" -> EOS and "B" -> "B" by a margin of ~30 nats. The dataset is laid out with the sampler's
own order so that actor rank 0 gets only "A" prompts (responses of 1 token) and rank 1 only "B"
prompts (responses of max_new_tokens). Without ranks kept in step this test hangs until its timeout.
"""

from __future__ import annotations

import json

import pytest
import torch
from rlhf_trainer import checkpoint
from rlhf_trainer.data import Sampler, shard
from trainer_harness import launch, trainer_config

MAX_NEW_TOKENS = 6
BATCH, STEPS, ACTORS = 4, 2, 2


def bigram_model_folder(folder):
    """A tiny Llama (tiny tokenizer) whose next token depends on the current one only: A -> EOS, B -> B."""
    from rlhf_trainer import models
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # the layer adds nothing to the residual stream
        layer.mlp.down_proj.weight.zero_()
        hidden = model.model.norm(model.model.embed_tokens.weight)  # (V, H): what lm_head sees per token
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id] = 5 * hidden[a] / hidden[a].norm()
        model.lm_head.weight[b] = 5 * hidden[b] / hidden[b].norm()
        logits = model.lm_head(hidden)
    assert logits[a].argmax() == tok.eos_token_id and logits[b].argmax() == b
    assert logits[a, tok.eos_token_id] - logits[a].topk(2).values[1] > 20
    assert logits[b, b] - logits[b].topk(2).values[1] > 20
    return models.save_pretrained(model, tok, folder)


def rank_split_dataset(path):
    """Prompts "A" for every row actor rank 0 draws in the first STEPS steps, "B" for rank 1's."""
    size = BATCH * STEPS
    sampler = Sampler(size, BATCH, seed=0)
    prompt = {}
    for _ in range(STEPS):
        drawn = sampler.next_batch()
        for rank, letter in enumerate("AB"):
            prompt.update({i: letter for i in shard(drawn, rank, ACTORS)})
    assert sorted(prompt) == list(range(size))
    path.write_text("".join(json.dumps({"prompt": prompt[i], "answer": "1"}) + "\n" for i in range(size)))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["plain-prefill", "shared-prompt-prefill"])
def test_two_zero3_actor_ranks_with_different_response_lengths_finish(tmp_path, prefix_sharing):
    # prefixSharing adds a forward of each chunk's distinct prompts before generate: one per chunk on each rank
    model = bigram_model_folder(tmp_path / "bigram")
    data = rank_split_dataset(tmp_path / "prompts.jsonl")
    config = trainer_config(
        "grpo",
        roles={"actor": {"replicas": ACTORS, "deepspeed": {"zero_stage": 3}}, "reference": {"colocate_with": "actor"}},
        hyperparameters={"max_steps": STEPS, "batch_size": BATCH, "group_size": 2, "micro_batch_size": 2,
                         "inference_chunk_size": 2, "max_new_tokens": MAX_NEW_TOKENS,
                         "prefix_sharing": prefix_sharing},
        model={"path": str(model)}, dataset={"path": str(data), "format": "prompts"},
    )
    run = launch(config, tmp_path / "run", timeout=240)
    assert run.ok, run.describe()
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2]
    # Rank 0's responses are 1 token (EOS), rank 1's MAX_NEW_TOKENS "B"s: the mean over ranks says both.
    for row in rows:
        assert row["response_length"] == pytest.approx((1 + MAX_NEW_TOKENS) / 2), row
    assert checkpoint.select_resume_step(run.checkpoint_dir, ["actor", "reference"]) == STEPS
