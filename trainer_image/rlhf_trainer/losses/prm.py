"""Process reward model (PRM): a two-class token classifier read at each step's separator token.

Training (Lightman et al. 2023, "Let's Verify Step by Step", section 2.6: the PRM predicts each
step's correctness at the step's last token; Uesato et al. 2022; TRL's PRMTrainer: labels only on
the separator-final token of every step, -100 elsewhere, cross-entropy over 2 labels):
    L = - sum_{labelled k} [ y_k log p_k + (1 - y_k) log (1 - p_k) ] / num_labels
with p_k = softmax(logits_k)[1] the probability that step k is correct and y_k the target in
[0, 1]: a boolean label gives 1 / 0 (TRL), a label in [-1, 1] gives (label + 1) / 2 (a soft
target; -1 wrong, 0 neutral, +1 right as in PRM800K). num_labels is the labelled-step count of
the global batch (divided by the ranks, see common.global_normaliser).

Scoring: a step's score is p_k - (1 - p_k) = 2 p_k - 1 = tanh((z_1 - z_0) / 2) in [-1, 1], the
scale the seed slides use for per-line rewards.

Dense rewards in PPO (seed slides, "DenseReward"): step k of a response gets its score s_k on the
response token that ends it, times a weight w_k (0 for steps a pattern marks, e.g. comment
lines, else 1); with length normalisation every weight is divided by the number of weighted
steps, so a response's summed process reward stays in [-1, 1] however many steps it has. The
outcome score and the KL penalty are added by losses.gae.token_rewards as for any reward.

ValueInit (seed slides): the critic can start from the PRM, its backbone and a value head made from
the two-label head, value = (z_1 - z_0) / 2 = atanh(score): the PRM's score before the tanh, which
is the score itself near 0 (tanh(x) ~ x) and keeps growing where the score saturates at +-1.

Metrics: step accuracy (a step is predicted correct when its score >= 0; a label >= 0 counts as
correct, as Lightman et al. count neutral steps as acceptable) and first-wrong-step accuracy: the
share of examples whose first predicted-wrong step is their first labelled-wrong step (or both
"none").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100.0


def label_target(label: bool | float) -> float:
    """A step label -> the probability target in [0, 1]; ValueError outside [-1, 1]."""
    if isinstance(label, bool):
        return 1.0 if label else 0.0
    if not -1.0 <= float(label) <= 1.0:
        raise ValueError(f"a step label must be a boolean or a number in [-1, 1], got {label!r}")
    return (float(label) + 1.0) / 2.0


def prm_loss(logits: torch.Tensor, targets: torch.Tensor, *,
             num_labels: float | torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, 2) logits, (B, T) targets in [0, 1] (IGNORE elsewhere) -> summed soft cross-entropy
    over the labelled positions / num_labels (default: this batch's labelled count)."""
    labelled = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    y = targets.float().clamp(0.0, 1.0)
    per_position = -(y * logp[..., 1] + (1.0 - y) * logp[..., 0])
    total = (per_position * labelled).sum()
    norm = labelled.sum().clamp(min=1) if num_labels is None else num_labels
    return total / norm


def step_scores(logits: torch.Tensor) -> torch.Tensor:
    """(..., 2) logits -> (...) scores 2 p(correct) - 1 in [-1, 1]."""
    logits = logits.float()
    return torch.tanh((logits[..., 1] - logits[..., 0]) / 2.0)


def first_wrong(correct: Sequence[bool]) -> int:
    """Index of the first False, or len(correct) when every step is correct."""
    return next((i for i, ok in enumerate(correct) if not ok), len(correct))


def step_metrics(scores: Sequence[Sequence[float]], targets: Sequence[Sequence[float]]) -> dict[str, float]:
    """Per example: predicted scores and targets of its steps -> counts for the metrics.

    Returns {"steps", "steps_correct", "examples", "first_wrong_correct"}: sums, so ranks can add
    them up before dividing.
    """
    out = {"steps": 0.0, "steps_correct": 0.0, "examples": 0.0, "first_wrong_correct": 0.0}
    for example_scores, example_targets in zip(scores, targets, strict=True):
        predicted = [s >= 0.0 for s in example_scores]
        actual = [t >= 0.5 for t in example_targets]
        out["steps"] += len(actual)
        out["steps_correct"] += sum(p == a for p, a in zip(predicted, actual, strict=True))
        out["examples"] += 1
        out["first_wrong_correct"] += first_wrong(predicted) == first_wrong(actual)
    return out


def dense_step_rewards(scores: Sequence[Sequence[float]], token_ends: Sequence[Sequence[int]],
                       weights: Sequence[Sequence[float]], response_length: int, *,
                       normalise: bool) -> torch.Tensor:
    """Per response: step scores, the response token index ending each step, and step weights
    -> (B, R) rewards with w_k s_k (w_k / sum_j w_j with `normalise`) at token_ends[k].

    Several steps ending on the same token add up; an index outside [0, R) raises ValueError.
    """
    rewards = torch.zeros(len(scores), response_length, dtype=torch.float32)
    for row, (row_scores, row_ends, row_weights) in enumerate(zip(scores, token_ends, weights, strict=True)):
        total = sum(row_weights)
        scale = 1.0 / total if normalise and total > 0 else 1.0
        for score, end, weight in zip(row_scores, row_ends, row_weights, strict=True):
            if not 0 <= end < response_length:
                raise ValueError(f"row {row}: a step ends at token {end}, outside the {response_length} response tokens")
            rewards[row, end] += score * weight * scale
    return rewards


def value_head_from_prm(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PRM's (2, H) head weight and (2,) bias (None: no bias) -> (1, H) weight, (1,) bias of a value
    head whose output is (z_1 - z_0) / 2 (see ValueInit above)."""
    value_weight = ((weight[1] - weight[0]) / 2.0).unsqueeze(0)
    value_bias = torch.zeros(1, dtype=weight.dtype) if bias is None else ((bias[1] - bias[0]) / 2.0).reshape(1)
    return value_weight, value_bias
