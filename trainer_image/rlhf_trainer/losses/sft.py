"""Supervised fine-tuning: masked next-token cross-entropy, and packing examples into rows.

Labels are the input ids with prompt (and padding) positions set to IGNORE_INDEX, so only
response tokens are learned (InstructGPT's SFT; Ouyang et al. 2022). The loss divides the token
sum by `num_tokens`, the count of learned tokens in the global batch, as the PPO losses do.

Packing concatenates several examples into one row; `position_ids` restart at 0 for each example
and the first token of every example gets IGNORE_INDEX, so nothing is learned across a boundary.
Hugging Face models (transformers >= 5) given position_ids, NO attention_mask and use_cache=False
detect the restarts and keep each example's attention inside itself (block-diagonal causal
mask); with an attention_mask or a cache they silently attend across examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_trainer.losses.utils import logprobs_from_logits

IGNORE_INDEX = -100


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions the shifted loss learns from: labels[:, 1:] != IGNORE_INDEX."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, *,
             num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> sum of CE(logits[t], labels[t+1]) / num_tokens.

    The token log-probs are selective (losses.utils.logprobs_from_logits): no float32 copy of the
    whole batch's logits. Positions labelled IGNORE_INDEX contribute nothing (nor any gradient).
    """
    shifted = labels[:, 1:]
    learned = shifted != IGNORE_INDEX
    logprobs = logprobs_from_logits(logits[:, :-1], shifted.masked_fill(~learned, 0))
    total = -(logprobs * learned).sum()
    norm = count_loss_tokens(labels).clamp(min=1) if num_tokens is None else num_tokens
    return total / norm


def pack_sequences(examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int,
                   pad_token_id: int) -> dict[str, torch.Tensor]:
    """(input_ids, labels) examples -> rows (N, max_length) of input_ids, labels, position_ids.

    Examples are placed in order, a new row starting when the next one does not fit; an example
    longer than max_length keeps its first max_length tokens. Padding at the end of a row forms
    its own position run (starting at 0) with IGNORE_INDEX labels.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example_ids, example_labels in examples:
        if len(example_ids) != len(example_labels):
            raise ValueError("input_ids and labels of an example differ in length")
        example_ids, example_labels = list(example_ids[:max_length]), list(example_labels[:max_length])
        if ids and len(ids) + len(example_ids) > max_length:
            rows.append((ids, labels, positions))
            ids, labels, positions = [], [], []
        ids += example_ids
        labels += [IGNORE_INDEX] + example_labels[1:]  # never predict across a boundary
        positions += list(range(len(example_ids)))
    if ids:
        rows.append((ids, labels, positions))
    out = {name: torch.empty((len(rows), max_length), dtype=torch.long)
           for name in ("input_ids", "labels", "position_ids")}
    for i, (row_ids, row_labels, row_positions) in enumerate(rows):
        pad = max_length - len(row_ids)
        out["input_ids"][i] = torch.tensor(row_ids + [pad_token_id] * pad)
        out["labels"][i] = torch.tensor(row_labels + [IGNORE_INDEX] * pad)
        out["position_ids"][i] = torch.tensor(row_positions + list(range(pad)))
    return out


def pack_examples(batch: dict[str, torch.Tensor], labels: torch.Tensor, *, max_length: int | None = None,
                  pad_token_id: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Pack a right-padded batch (data.encode_prompt_responses) and its (B, T) labels.

    Returns ({"input_ids": (N, L)}, labels (N, L), position_ids (N, L)) with L = max_length or T.
    There is deliberately no attention_mask: call the model with attention_mask=None,
    position_ids=position_ids, use_cache=False, or examples would attend to each other.
    """
    width = max_length or batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(-1).tolist()
    examples = [(batch["input_ids"][i, :n].tolist(), labels[i, :n].tolist()) for i, n in enumerate(lengths)]
    packed = pack_sequences(examples, max_length=width, pad_token_id=pad_token_id)
    return {"input_ids": packed["input_ids"]}, packed["labels"], packed["position_ids"]
