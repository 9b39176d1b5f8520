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


# Logit entries upcast to float32 at a time by the token log-prob and entropy functions: about
# 2**26 floats (256 MiB), e.g. 1365 positions of a 49152-word vocabulary.
LOGIT_CHUNK_ELEMENTS = 1 << 26


def logit_chunks(rows: int, tokens: int, vocab: int, chunk_elements: int = LOGIT_CHUNK_ELEMENTS):
    """(row slice, token slice) blocks covering a (rows, tokens, vocab) tensor, each at most
    `chunk_elements` entries (or one position, when a single one is larger): whole rows when a
    row fits, else pieces of one row. Indexing with them gives views, never copies."""
    per_row = tokens * vocab
    if per_row <= chunk_elements:
        step = max(1, chunk_elements // max(per_row, 1))
        return [(slice(b, min(b + step, rows)), slice(None)) for b in range(0, rows, step)]
    step = max(1, chunk_elements // vocab)
    return [(slice(b, b + 1), slice(t, min(t + step, tokens))) for b in range(rows) for t in range(0, tokens, step)]


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # float32 at least (bf16 / fp16 logits are upcast); float64 stays float64 (gradcheck).
    return torch.promote_types(logits.dtype, torch.float32)


class _TokenLogProb(torch.autograd.Function):
    """log softmax(z / T)[y] for every position of (B, T, V) logits z, without a float32 copy of them all.

    Forward, per logit_chunks block: lse = logsumexp(z / T), out = z[y] / T - lse (TRL's
    selective_log_softmax does the same per batch row). Saved for backward: the logits (alive
    anyway as the model's output), the labels and the (B, T) lse. Backward, per block:
    d out / d z_j = (1[j = y] - softmax(z / T)_j) / T, written into a gradient of the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_elements):
        dtype = _compute_dtype(logits)
        out = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for rows, cols in logit_chunks(*logits.shape, chunk_elements):
            z = logits[rows, cols].to(dtype) / temperature
            lse[rows, cols] = torch.logsumexp(z, dim=-1)
            out[rows, cols] = z.gather(-1, labels[rows, cols, None]).squeeze(-1) - lse[rows, cols]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.chunk_elements = temperature, chunk_elements
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        temperature = ctx.temperature
        g = grad_out.to(lse.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for rows, cols in logit_chunks(*logits.shape, ctx.chunk_elements):
            p = (logits[rows, cols].to(lse.dtype) / temperature).sub_(lse[rows, cols, None]).exp_()  # softmax
            gb = g[rows, cols, None]
            p.mul_(-gb).scatter_add_(-1, labels[rows, cols, None], gb).div_(temperature)
            grad[rows, cols] = p
        return grad, None, None, None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *,
                         chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> torch.Tensor:
    """(B, T, V) logits, (B, T) token ids -> (B, T) log softmax(logits / temperature)[label], float32.

    Selective: the chosen token's log-prob is gathered and its logsumexp computed a chunk of
    tokens at a time, so at most `chunk_elements` logits are upcast at once, instead of the whole
    batch's float32 (B, T, V) log_softmax (and its copies); backward likewise (_TokenLogProb).
    Equals log_softmax(logits.float() / temperature).gather(-1, labels) to float rounding.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"expected (B, T, V) logits and (B, T) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return _TokenLogProb.apply(logits, labels, float(temperature), chunk_elements)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, *,
                        chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of softmax(logits / T): logsumexp(z) - sum(softmax(z) * z).

    Without grad (a statistic) it is computed chunk by chunk as logprobs_from_logits, so no float32
    copy of the whole batch's logits is made; differentiable (an entropy bonus) when the logits
    require grad and grad is enabled, then over the whole batch at once.
    """
    dtype = _compute_dtype(logits)
    if torch.is_grad_enabled() and logits.requires_grad:
        z = logits.to(dtype) / temperature
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    out = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
    with torch.no_grad():
        for rows, cols in logit_chunks(*logits.shape, chunk_elements):
            z = logits[rows, cols].detach().to(dtype) / temperature
            out[rows, cols] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return out


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the last 1 in each row; works for left and right padding."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.long()).argmax(-1)
