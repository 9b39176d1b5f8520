"""Sampling rollouts exactly from the distribution the log-probs describe.

    stops = stop_token_ids(tokenizer, model.config, model.generation_config)
    with only_these_settings(model):
        out = model.generate(input_ids=..., attention_mask=...,
                             generation_config=sampling_config(temperature=1.0, max_new_tokens=16,
                                                               stop_ids=stops, pad_token_id=tok.pad_token_id))

PPO / GRPO / RLOO compute a sampled token's probability as softmax(logits / temperature) over the
whole vocabulary (rlhf_trainer.losses.utils.logprobs_from_logits). The importance ratio and the KL
are only right if the tokens were sampled from that same distribution, so sampling uses the
temperature and nothing else: no top-k / top-p / min-p / typical truncation (none is offered: the
log-probs would have to be renormalised over the same truncated set), no repetition penalty, no
forced or suppressed tokens, no minimum length. A checkpoint's own `generation_config.json` (SmolLM2
and Llama ship sampling defaults; some ship `repetition_penalty`) must not switch any of these on:
transformers fills every setting a call leaves unset from the model's generation_config, so the
call sets each of them to its neutral value and the model's config is set aside during the call.

Every end-of-sequence id of the model ends a response (Llama 3 has three, `generation_config.eos_token_id`
lists them); the tokenizer's `eos_token` is only one of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def stop_token_ids(tokenizer, *configs) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS first, then the `eos_token_id`s of `configs`
    (a model's config and generation_config; each may hold one id or a list)."""
    ids = _ids(tokenizer.eos_token_id)
    for config in configs:
        ids += _ids(getattr(config, "eos_token_id", None))
    return tuple(dict.fromkeys(ids))


# Each generation setting that changes which tokens can be sampled, or with what probability, at
# the value that turns it off (transformers.generation.utils._get_logits_processor).
NEUTRAL = dict(
    top_k=0, top_p=1.0, min_p=None, top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, sequence_bias=None, min_length=0, min_new_tokens=None, forced_bos_token_id=None,
    forced_eos_token_id=None, suppress_tokens=None, begin_suppress_tokens=None, exponential_decay_length_penalty=None,
    guidance_scale=None, renormalize_logits=False, watermarking_config=None, stop_strings=None, max_time=None,
    num_beams=1, num_return_sequences=1,
)


def sampling_config(*, temperature: float, max_new_tokens: int, stop_ids: Sequence[int],
                    pad_token_id: int) -> GenerationConfig:
    """Pure ancestral sampling at `temperature`, up to `max_new_tokens`, stopping at any of `stop_ids`."""
    return GenerationConfig(do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                            eos_token_id=list(stop_ids), pad_token_id=pad_token_id, **NEUTRAL)


@contextmanager
def only_these_settings(model) -> Iterator[None]:
    """Set the model's own generation_config aside for the block, so none of its values fill settings.

    (With a neutral GenerationConfig in its place, transformers fills unset values with its library
    defaults only; `sampling_config` sets every one that matters.) The model keeps its config
    afterwards, so an exported folder still carries the checkpoint's generation_config.json.
    """
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


class SampledLogProbs(LogitsProcessor):
    """A transformers logits processor that records each sampled token's log-probability.

    Under `sampling_config` the scores it is handed are the model's raw float32 logits (custom
    processors run before the temperature warper, and no other processor is on), so
    log_softmax(scores / temperature) is exactly the distribution the next token is drawn from, the
    one losses.utils.logprobs_from_logits describes. The token drawn at step t is known only at the
    next call (the last column of `input_ids`) or, for the last step, from the output: `finish`
    gathers it. Memory: one (B, V) float32 row of log-probs at a time, not the (B, R, V) that
    `output_logits` would keep. TRL's PPOTrainer takes its old log-probs from the generation's
    logits the same way (trl/trainer/ppo_trainer.py, `batch_generation`).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # (B, V) log-probs of the step whose token is not drawn yet
        self.columns: list[torch.Tensor] = []  # (B, 1) each

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.columns.append(self.pending.gather(-1, input_ids[:, -1:]))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, response_ids: torch.Tensor) -> torch.Tensor:
        """(B, R) generated ids (on the generating device) -> (B, R) float32 log-probs of those tokens."""
        if self.pending is not None and len(self.columns) < response_ids.shape[1]:
            self.columns.append(self.pending.gather(-1, response_ids[:, -1:]))
        self.pending = None
        return torch.cat(self.columns, dim=1) if self.columns else response_ids.new_zeros(response_ids.shape, dtype=torch.float32)
