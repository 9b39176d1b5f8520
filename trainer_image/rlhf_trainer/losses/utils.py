"""Masked reductions and log-prob helpers shared by every loss (pure torch).

Masks are 0/1 tensors of the same shape as the values; a masked-out entry never contributes.

Statistics that steer training (advantage whitening, the KL controller's input) must be the same
on every data-parallel rank, else the ranks optimise different objectives and their shared
weights drift apart from what any one batch asks for. Those helpers take `reduce`, a function
summing a tensor over the ranks (distributed.all_reduce_tensor in the loops; the identity, the
default, with one process): the moments are built from global sums, never from local means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def identity(t: torch.Tensor) -> torch.Tensor:
    """The `reduce` of one process: the local sums are the global sums."""
    return t


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over entries where mask is 1 (0 where the mask is empty, instead of NaN)."""
    return masked_sum(values, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def global_masked_moments(values: torch.Tensor, mask: torch.Tensor, *,
                          reduce: Reduce = identity) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked entries of `values` on ALL ranks (scalars).

    Two reductions in float64: [sum, count], then the sum of squared deviations from the global
    mean (more accurate than E[x^2] - E[x]^2). Every rank gets the same two numbers.
    """
    sums = reduce(torch.stack([(values * mask).sum(), mask.sum()]).double())
    count = sums[1]
    mean = sums[0] / count.clamp(min=1)
    squares = reduce((((values.double() - mean) ** 2) * mask).sum())
    var = squares / (count - 1).clamp(min=1)
    return mean.to(values.dtype), var.to(values.dtype)


def global_mean(values: torch.Tensor, *, reduce: Reduce = identity) -> float:
    """Mean of all entries of `values` over all ranks (ranks may hold different counts)."""
    sums = reduce(torch.stack([values.double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                   device=values.device)]))
    return float(sums[0] / sums[1].clamp(min=1))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, *, reduce: Reduce = identity) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries of all ranks; masked-out -> 0.

    With `reduce` summing over the ranks, the whitened batch is the one a single process holding
    every rank's rows would compute (OpenRLHF and TRL whiten over the gathered batch too).
    """
    mean, var = global_masked_moments(values, mask, reduce=reduce)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) token ids -> (B, T) log p(label), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the softmax: logsumexp(z) - sum(softmax(z) * z)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the last 1 in each row; works for left and right padding."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.long()).argmax(-1)
