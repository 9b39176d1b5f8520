"""Forward passes of the trainer's models: token log-probs (actor, reference), scores (reward), in row chunks.

    logprobs, logits = token_logprobs(model, ids, mask, temperature=0.7, response_length=R)  # (B, R), (B, R, V)
    ref = chunked(lambda s: token_logprobs(ref_model, ids[s], mask[s])[0], rows=B, chunk_size=8)  # (B, T-1)

A pass that needs no gradient (old and reference log-probs, reward scores, critic values) runs
`hyperparameters.inference_chunk_size` rows at a time through `chunked`, so its peak memory
(activations, and the (rows, T, V) logits) is that of one chunk, not of the whole batch; the
chunks' outputs are concatenated, equal to one pass over the batch to float rounding. Token
log-probs never materialise a float32 log_softmax of the logits (losses.utils.logprobs_from_logits),
and when only the last R tokens are wanted the model computes logits for those positions only
(Hugging Face's `logits_to_keep`, as TRL's GRPO trainer passes it). With `padding_free`
(hyperparameters.paddingFree) the rows' real tokens go through the model as one packed sequence, so
the padding of a batch of uneven rows costs nothing (packed_token_logprobs).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable

import torch

from rlhf_trainer.data import position_ids_from_mask
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.losses.utils import logprobs_from_logits


def row_slices(rows: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most `chunk_size` rows covering `rows` rows (ValueError if chunk_size < 1)."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1, got {chunk_size}")
    return [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


def chunked(fn: Callable[[slice], torch.Tensor], *, rows: int, chunk_size: int) -> torch.Tensor:
    """torch.cat of fn(rows slice) over row_slices(rows, chunk_size), along dim 0."""
    return torch.cat([fn(s) for s in row_slices(rows, chunk_size)])


def edge_padding(attention_mask: torch.Tensor, side: str) -> torch.Tensor:
    """(B, T) -> (B,) long: the columns before a row's first real token (side "left") or after its last
    ("right"); T for a row with none."""
    real = attention_mask.bool()
    if side == "right":
        real = real.flip(-1)
    elif side != "left":
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return (real.long().cumsum(-1) == 0).sum(-1)


def chunked_rows(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, *, chunk_size: int, side: str = "left") -> torch.Tensor:
    """fn(input_ids, attention_mask) of (b, T') rows -> (b, ...) outputs whose shape does not depend on T'
    (log-probs or values of the last R tokens, one score per row), over (B, T) rows `chunk_size` at a time,
    torch.cat in the callers' order.

    The rows of a pass are independent, so with several chunks they go by their padding on `side` (the
    prompt's left padding of a rollout, "left"; a right-padded row's tail, "right"), and each chunk drops the
    columns that are padding in all of its rows: no forward over another chunk's padding, as generation's
    chunks (common.sample). The sort is stable: a group's copies of one prompt stay side by side
    (prefixSharing). ValueError if chunk_size < 1."""
    rows, width = input_ids.shape
    slices = row_slices(rows, chunk_size)
    padding = edge_padding(attention_mask, side).clamp(max=width - 1)
    order = (torch.argsort(padding, descending=True, stable=True) if len(slices) > 1
             else torch.arange(rows, device=input_ids.device))
    pieces = []
    for s in slices:
        index = order[s]
        cut = int(padding[index].min())
        columns = slice(cut, None) if side == "left" else slice(0, width - cut)
        pieces.append(fn(input_ids[index, columns], attention_mask[index, columns]))
    return torch.cat(pieces)[torch.argsort(order)]


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _accepts_logits_to_keep(model) -> bool:
    """Whether the nn.Module behind `model` (a module, a DeepSpeed engine, or a bound method such as
    DeepSpeedStrategy.forward) takes `logits_to_keep` (Hugging Face causal LMs of transformers >= 4.50)."""
    module = _module_of(model)
    return module is not None and _forward_takes_logits_to_keep(type(module))


def _module_of(model) -> torch.nn.Module | None:
    """The nn.Module behind a module, a DeepSpeed engine, or a bound method such as DeepSpeedStrategy.forward."""
    target = getattr(model, "__self__", model)
    while hasattr(target, "module") and isinstance(target.module, torch.nn.Module) and target.module is not target:
        target = target.module
    return target if isinstance(target, torch.nn.Module) else None


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float = 1.0,
                   response_length: int = 0, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a causal LM -> (log-probs, logits) of the tokens it predicts.

    input_ids, attention_mask: (B, T), left or right padded; positions count real tokens only, as in
    generation. response_length R = 0: log-probs of tokens 1..T-1, (B, T-1), with their (B, T-1, V)
    logits; R > 0: of the last R tokens only, (B, R) and (B, R, V), the model computing logits for
    those positions alone when it can. Log-probs are float32 of softmax(logits / temperature), the
    distribution the tokens were sampled from; the logits are the model's own (its dtype, not
    divided by the temperature). Differentiable when the model is. `padding_free`: the same through
    packed_token_logprobs when every row's real tokens are one run (no hole), at no cost for padding.
    """
    if padding_free:
        # Checked whatever this batch's rows: under ZeRO-3 every rank must run the check's forwards alike.
        require_packing(model)
        if contiguous_rows(attention_mask):
            return packed_token_logprobs(model, input_ids, attention_mask, temperature=temperature,
                                         response_length=response_length)
    kwargs = {}
    keep = response_length + 1 if response_length else 0
    if keep and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        use_cache=False, **kwargs,
    ).logits
    logits = logits[:, -keep:-1] if keep else logits[:, :-1]
    labels = input_ids[:, -response_length:] if response_length else input_ids[:, 1:]
    return logprobs_from_logits(logits, labels, temperature), logits


def contiguous_rows(attention_mask: torch.Tensor) -> bool:
    """(B, T) 0/1 mask -> whether every row's real tokens are one non-empty run (left and/or right padding
    only), so that in the packed order each real token is followed by the next one of its row."""
    real = attention_mask.bool()
    count = real.sum(-1)
    T = real.shape[1]
    first = real.long().argmax(-1)
    last = T - 1 - real.flip(-1).long().argmax(-1)
    return bool((count > 0).all() and (last - first + 1 == count).all())


def packed_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float = 1.0,
                          response_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs without padding: the K real tokens of the (B, T) rows go through the model as one
    (1, K) sequence whose position ids restart at 0 with each row, which Hugging Face models turn into a
    block-diagonal causal mask (masking_utils.find_packed_sequence_indices; verl's use_remove_padding,
    OpenRLHF's packing_samples, TRL's padding_free). Linear layers then cost K token positions, not B x T.

    Rows must be contiguous_rows (left and/or right padded). Returns token_logprobs' (B, R) float32
    log-probs and (B, R, V) logits (R = response_length, or T - 1), 0 where the padded forward would have
    a padding column (no real token predicted from a real one); the real entries equal the padded
    forward's to float rounding, differentiable when the model is. Logits are computed only for the
    positions that predict those entries. The model must keep packed rows apart: token_logprobs checks
    it (require_packing) before calling this.
    """
    B, T = input_ids.shape
    R = response_length or T - 1
    real = attention_mask.bool()
    wanted = real[:, T - R:] & real[:, T - R - 1:T - 1]  # (B, R): a real token predicted from a real one
    packed_at = (real.flatten().long().cumsum(0) - 1).view(B, T)  # each real token's index in the packed row
    keep = packed_at[:, T - R - 1:T - 1][wanted]  # (M,) packed positions whose logits are wanted
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(**packed_inputs(input_ids, attention_mask), use_cache=False, **kwargs).logits[0]
    if not kwargs:
        logits = logits[keep]
    logprobs = logprobs_from_logits(logits[None], input_ids[:, T - R:][wanted][None], temperature)[0]
    where = wanted.nonzero(as_tuple=True)
    return (logprobs.new_zeros(B, R).index_put(where, logprobs),
            logits.new_zeros(B, R, logits.shape[-1]).index_put(where, logits))


def packed_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """(B, T) contiguous_rows -> a forward's keyword arguments for their K real tokens as one (1, K) row:
    input_ids, position_ids restarting at 0 with each row, and no attention mask (the model derives the
    block-diagonal one from the positions)."""
    real = attention_mask.bool()
    return {"input_ids": input_ids[real][None], "attention_mask": None,
            "position_ids": position_ids_from_mask(attention_mask)[real][None]}


def require_packing(model) -> None:
    """ConfigError naming hyperparameters.paddingFree unless packing_honoured(model)."""
    if not packing_honoured(model):
        module = _module_of(model)
        raise ConfigError(f"hyperparameters.paddingFree: {type(module).__name__ if module is not None else model} "
                          "lets the tokens of packed rows attend to each other (its attention mask ignores the "
                          "position ids restarting at 0); turn paddingFree off for this model")


_PACKING_HONOURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def packing_honoured(model) -> bool:
    """Whether `model` keeps packed rows apart, checked once per module on three 5-token forwards (in eval
    mode, so dropout cannot blur them): the second row's logits packed after a first row must equal
    its logits alone far more closely than they equal its logits when it does attend to the first row.
    A model whose mask ignores restarting position ids would silently mix rows; no such model is run packed."""
    module = _module_of(model)
    if module is None:
        return False
    if module in _PACKING_HONOURED:
        return _PACKING_HONOURED[module]
    device = next(module.parameters()).device
    vocab = int(getattr(getattr(module, "config", None), "vocab_size", 0) or 2)
    ids = torch.arange(5, device=device)[None] * 7919 % vocab  # fixed, distinct tokens: the same on every rank
    positions = torch.tensor([[0, 1, 2, 0, 1]], device=device)
    training = module.training
    module.eval()
    try:
        alone = _output(model(input_ids=ids[:, 3:], position_ids=positions[:, 3:], use_cache=False))[0].float()
        packed = _output(model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False))[0, 3:].float()
        mixed = _output(model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                              use_cache=False))[0, 3:].float()
    finally:
        module.train(training)
    apart, together = (packed - alone).abs().max(), (mixed - alone).abs().max()
    honoured = bool(apart * 10 <= together) or bool(together == 0)
    _PACKING_HONOURED[module] = honoured
    return honoured


@torch.no_grad()
def chunked_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunk_size: int,
                           temperature: float = 1.0, response_length: int = 0, padding_free: bool = False,
                           prefix_sharing: bool = False) -> torch.Tensor:
    """token_logprobs' log-probs without grad, `chunk_size` rows per forward: (B, T-1), or (B, R) with R.
    `prefix_sharing` (rows in rollout_logprobs' layout, R > 0): each chunk's distinct prompts once, so rows
    that share a prompt (a group's samples, a pair's two responses) should be neighbours."""
    def one(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if prefix_sharing and response_length:
            return rollout_logprobs(model, ids, mask, temperature=temperature,
                                    response_length=response_length, prefix_sharing=True, padding_free=padding_free)[0]
        return token_logprobs(model, ids, mask, temperature=temperature,
                              response_length=response_length, padding_free=padding_free)[0]

    if response_length:  # (B, R) whatever the columns: chunks of like-padded rows, each without its padding
        return chunked_rows(one, input_ids, attention_mask, chunk_size=chunk_size)
    return chunked(lambda s: one(input_ids[s], attention_mask[s]), rows=input_ids.shape[0], chunk_size=chunk_size)


def _output(out) -> torch.Tensor:
    """A forward's per-token output: a causal LM's logits, a base model's last hidden state."""
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    padding_free: bool = False) -> torch.Tensor:
    """(B, T) -> (B,) float32 scores of a one-label sequence classifier (it pools the last non-pad token).
    `padding_free`: the same with the base model run packed (packed_hidden_states) and the `score` head
    applied at the token the classifier pools, when the model allows it (a Hugging Face classifier with
    a `score` head and a pad token) and the rows are contiguous_rows; ConfigError naming
    hyperparameters.paddingFree when its base model mixes packed rows."""
    module = _module_of(model)
    base = getattr(module, getattr(module, "base_model_prefix", ""), None)
    pad = getattr(getattr(module, "config", None), "pad_token_id", None)
    if padding_free and base is not None and hasattr(module, "score") and pad is not None:
        require_packing(base)  # whatever this batch's rows: ZeRO-3 ranks run the check's forwards alike
        if contiguous_rows(attention_mask):
            hidden = packed_hidden_states(base, input_ids, attention_mask)
            # The row's rightmost real token that is not the pad id: where the classifier pools
            pooled = (input_ids != pad) & attention_mask.bool()
            last = (torch.arange(input_ids.shape[1], device=input_ids.device) * pooled).argmax(-1)
            return module.score(hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last])[:, 0].float()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def packed_hidden_states(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) contiguous_rows -> (B, T, H) last hidden states of `backbone` (a Hugging Face base model, e.g.
    a critic's or a reward model's) with the rows' K real tokens run as one packed (1, K) sequence, as
    packed_token_logprobs does; 0 at padding. Differentiable when the backbone is. The backbone must keep
    packed rows apart (require_packing)."""
    real = attention_mask.bool()
    hidden = backbone(**packed_inputs(input_ids, attention_mask), use_cache=False).last_hidden_state[0]
    return hidden.new_zeros(*input_ids.shape, hidden.shape[-1]).index_put(real.nonzero(as_tuple=True), hidden)


def shared_prompt_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                           response_mask: torch.Tensor, prompt_index: torch.Tensor, *,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of several responses per prompt with each prompt computed once (prefix sharing).

    prompt_ids, prompt_mask: (U, P) left-padded, every row with at least one real token;
    response_ids, response_mask: (N, R) right-padded; prompt_index: (N,) long, the prompt row each
    response answers. Returns token_logprobs' pair for the responses: (N, R) float32 log-probs of
    softmax(logits / temperature) and the (N, R, V) logits. Equal to token_logprobs over the
    `prompt + response` rows to float rounding, differentiable when the model is, at U*P + N*R instead
    of N*(P + R) token positions (Wang et al. 2024, "Accelerating Direct Preference Optimization with
    Prefix Sharing").

    One forward, as in the paper: each prompt's row holds it followed by all its responses, and a
    (U, 1, L, L) attention mask lets each response see its prompt and itself only (prefix_shared_rows).
    A model that ignores a custom mask (shared_mask_honoured: flash attention, for one), a model with
    sliding-window attention (the custom mask would let tokens see past the window), and, unless the
    model checkpoints its layers in this forward or is sharded by ZeRO-3, layouts whose one forward would
    cost more than the two (prefix_sharing_costs: many long responses per prompt) run the responses
    against the prompts' key/value cache in a second forward instead (cached_shared_logprobs). Every
    rule but the cost reads the model alone, so ZeRO-3 ranks with different rows take the same path.
    """
    (U, P), (N, R), K = prompt_ids.shape, response_ids.shape, _most_responses(prompt_index)
    masked, cached = prefix_sharing_costs(_hidden_size(model), U, P, N, R, K)
    # Under gradient checkpointing the cached path has no cache to run against. Under ZeRO-3 every rank
    # must run as many forwards as the others whatever its rows, and one forward gathers the weights once.
    if shared_mask_honoured(model) and not _sliding_window(model) and (
            _checkpointing(model) or _zero3_partitioned(model) or masked <= 1.1 * cached):
        return masked_shared_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index,
                                      temperature=temperature)
    return cached_shared_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index,
                                  temperature=temperature)


def prefix_sharing_costs(hidden_size: int, U: int, P: int, N: int, R: int, K: int) -> tuple[int, int]:
    """(one masked forward, cached prompt forward + response forward) costs of shared_prompt_logprobs for U
    prompts of P columns, N responses of R columns, at most K per prompt, in units of 4·d FLOPs per layer
    (d = hidden_size): a token's linear layers cost about 24·d² per layer, 6·d units, and each query-key
    pair of attention 4·d, one unit (Kaplan et al. 2020, table 1). The masked rows (U, P + K·R) pay for
    every pair of a row, the slots of other responses included; the cached path for each prompt's pairs
    and each response against its prompt and itself. hidden_size 0 (unknown): both costs 0."""
    L = P + K * R
    masked = 6 * hidden_size * U * L + U * L * L
    cached = 6 * hidden_size * (U * P + N * R) + U * P * P + N * R * (P + R)
    return (masked, cached) if hidden_size else (0, 0)


def _hidden_size(model) -> int:
    """The model's hidden size (config.hidden_size), 0 when it has none."""
    size = getattr(getattr(_module_of(model), "config", None), "hidden_size", 0)
    return size if isinstance(size, int) else 0


def _checkpointing(model) -> bool:
    """Whether this forward of `model` checkpoints its layers (grad on, training, checkpointing enabled),
    in which transformers keeps no key/value cache."""
    module = _module_of(model)
    if module is None or not (torch.is_grad_enabled() and module.training):
        return False
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5.x, then 4.x
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


def _most_responses(prompt_index: torch.Tensor) -> int:
    """The most responses one prompt has: the slots of prefix_shared_rows' rows."""
    return int(torch.bincount(prompt_index).max()) if prompt_index.numel() else 1


def _sliding_window(model) -> bool:
    """Whether the model's attention has a sliding window (config.sliding_window, unless its
    use_sliding_window is off, as in Qwen2's configs)."""
    config = getattr(_module_of(model), "config", None)
    window = getattr(config, "sliding_window", None)
    return isinstance(window, int) and window > 0 and getattr(config, "use_sliding_window", True) is not False


def _zero3_partitioned(model) -> bool:
    """Whether DeepSpeed ZeRO-3 shards the model's weights (its parameters carry a ds_id)."""
    module = _module_of(model)
    # ZeRO-3 converts every parameter at once: the first tells, without a walk over all of them per call
    first = next(module.parameters(), None) if module is not None else None
    return hasattr(first, "ds_id")


def prefix_shared_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                       response_mask: torch.Tensor, prompt_index: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """shared_prompt_logprobs' inputs -> one row per prompt: its P columns, then K slots of R columns, slot s
    holding its s-th response (K: the most responses of one prompt). Returns the forward's `input_ids` and
    `position_ids` (U, L = P + K*R) (a response's positions go on from its prompt's last), its additive
    `attention_mask` (U, 1, L, L) of `dtype` (0 where a query token sees a key, the dtype's minimum
    elsewhere: a real key at or before the query, in the prompt or in the query's own slot; every token
    sees itself, so a padding query has a key), and `predictors` (N, R) long: the column whose logits
    predict each response token (the prompt's last column for token 0)."""
    U, P = prompt_ids.shape
    N, R = response_ids.shape
    device = prompt_ids.device
    earlier = torch.nn.functional.one_hot(prompt_index, U).cumsum(0) - 1  # (N, U): earlier responses per prompt
    slot = earlier[torch.arange(N, device=device), prompt_index]  # (N,)
    K = _most_responses(prompt_index)
    L = P + K * R
    columns = P + slot[:, None] * R + torch.arange(R, device=device)  # (N, R) each response token's column
    ids = torch.zeros(U, L, dtype=prompt_ids.dtype, device=device)
    real = torch.zeros(U, L, dtype=torch.bool, device=device)
    segment = torch.zeros(U, L, dtype=torch.long, device=device)  # 0: prompt; s + 1: slot s
    rows = prompt_index[:, None].expand(N, R)
    ids[:, :P], real[:, :P] = prompt_ids, prompt_mask.bool()
    ids[rows, columns], real[rows, columns] = response_ids, response_mask.bool()
    segment[:, P:] = torch.arange(K, device=device).repeat_interleave(R) + 1
    positions = position_ids_from_mask(prompt_mask)
    positions = torch.cat([positions, positions.new_zeros(U, K * R)], 1)
    positions[rows, columns] = prompt_mask.sum(-1)[prompt_index, None] + torch.arange(R, device=device)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # (U, query, key)
    sees = (causal & same & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
    mask = torch.zeros(U, 1, L, L, dtype=dtype, device=device).masked_fill(~sees[:, None], torch.finfo(dtype).min)
    predictors = torch.cat([torch.full((N, 1), P - 1, device=device), columns[:, :-1]], 1)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "predictors": predictors}


def masked_shared_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                           response_mask: torch.Tensor, prompt_index: torch.Tensor, *,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """shared_prompt_logprobs as one forward over prefix_shared_rows, logits computed from the prompts' last
    column on. The model must honour a custom 4-D mask (shared_mask_honoured)."""
    P = prompt_ids.shape[1]
    shared = prefix_shared_rows(prompt_ids, prompt_mask, response_ids, response_mask, prompt_index,
                                dtype=_activation_dtype(model))
    L = shared["input_ids"].shape[1]
    keep = {"logits_to_keep": L - P + 1} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=shared["input_ids"], attention_mask=shared["attention_mask"],
                   position_ids=shared["position_ids"], use_cache=False, **keep).logits
    logits = logits[:, -(L - P + 1):]  # column P - 1 on
    logits = logits[prompt_index[:, None], shared["predictors"] - (P - 1)]  # (N, R, V)
    return logprobs_from_logits(logits, response_ids, temperature), logits


def _activation_dtype(model) -> torch.dtype:
    """The floating dtype of the model's embeddings (its activations' and so its attention mask's)."""
    module = _module_of(model)
    embeddings = module.get_input_embeddings() if module is not None and hasattr(module, "get_input_embeddings") else None
    dtype = getattr(getattr(embeddings, "weight", None), "dtype", torch.float32)
    return dtype if dtype.is_floating_point else torch.float32


_SHARED_MASK_HONOURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def shared_mask_honoured(model) -> bool:
    """Whether `model` applies a custom (B, 1, T, T) attention mask, checked once per module on one prompt
    with two responses (eval mode, so dropout cannot blur them): the second response's logits in
    prefix_shared_rows' one forward must equal its logits in `prompt + response` alone far more closely
    than its logits when it also sees the first response. Attention kernels that take no custom mask
    (flash attention) fail it; shared_prompt_logprobs then uses the key/value cache."""
    module = _module_of(model)
    if module is None:
        return False
    if module in _SHARED_MASK_HONOURED:
        return _SHARED_MASK_HONOURED[module]
    device = next(module.parameters()).device
    vocab = int(getattr(getattr(module, "config", None), "vocab_size", 0) or 2)
    ids = torch.arange(7, device=device)[None] * 7919 % vocab  # fixed, distinct tokens: the same on every rank
    prompt, first, second = ids[:, :3], ids[:, 3:5], ids[:, 5:]
    training = module.training
    module.eval()
    try:
        shared = masked_shared_logprobs(model, prompt, torch.ones_like(prompt), torch.cat([first, second]),
                                        torch.ones(2, 2, dtype=torch.long, device=device),
                                        torch.zeros(2, dtype=torch.long, device=device))[1][1].float()
        alone = _output(model(input_ids=torch.cat([prompt, second], 1), use_cache=False))[0, 2:4].float()
        mixed = _output(model(input_ids=ids, use_cache=False))[0, 4:6].float()
    except (TypeError, ValueError, RuntimeError):  # a forward that refuses a 4-D mask or position ids
        honoured = False
    else:
        apart, together = (shared - alone).abs().max(), (mixed - alone).abs().max()
        honoured = bool(apart * 10 <= together) and bool(together > 0)
    finally:
        module.train(training)
    _SHARED_MASK_HONOURED[module] = honoured
    return honoured


def cached_shared_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                           response_mask: torch.Tensor, prompt_index: torch.Tensor, *,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """shared_prompt_logprobs in two forwards: one over the U prompts keeps their key/value cache (with its
    autograd graph) and the logits of their last token, which predict each response's first token; a
    second runs the N responses against that cache, gathered by prompt_index. ConfigError naming
    hyperparameters.prefixSharing when the model keeps no cache in its forward, as under gradient
    checkpointing (transformers drops it in each checkpointed layer).
    """
    R = response_ids.shape[1]
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                  use_cache=True, **keep)
    cache = first.past_key_values
    if cache is None or cache.get_seq_length() != prompt_ids.shape[1]:
        raise ConfigError(f"hyperparameters.prefixSharing: {type(_module_of(model) or model).__name__} neither applies "
                          "a custom attention mask nor kept a key/value cache of the prompts in its forward "
                          "(roles.actor.deepspeed.gradientCheckpointing drops it): turn one of them off")
    cache.batch_select_indices(prompt_index)
    mask = torch.cat([prompt_mask[prompt_index], response_mask], dim=1)
    positions = prompt_mask.sum(-1)[prompt_index, None] + torch.arange(R, device=prompt_ids.device)
    rest = model(input_ids=response_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=True).logits
    # Position -1 of the prompt predicts response token 0; response position j predicts token j + 1.
    logits = torch.cat([first.logits[:, -1:][prompt_index], rest[:, :-1]], dim=1)
    return logprobs_from_logits(logits, response_ids, temperature), logits


def rollout_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, response_length: int,
                     temperature: float = 1.0, prefix_sharing: bool = False,
                     padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs(..., response_length=R) of rollout rows (B, P + R): left-padded prompts, then
    responses. With `prefix_sharing` the rows' distinct prompts go through the model once each
    (shared_prompt_logprobs: a GRPO group's samples share theirs), unless a prompt column block has
    an empty row (no token to predict the response's first one); else packed with `padding_free`."""
    P = input_ids.shape[1] - response_length
    if prefix_sharing:  # its first call runs forwards: on every rank, whichever path these rows take (ZeRO-3)
        shared_mask_honoured(model)
    if not prefix_sharing or P < 1 or not bool(attention_mask[:, P - 1].all()):
        return token_logprobs(model, input_ids, attention_mask, temperature=temperature, response_length=response_length,
                              padding_free=padding_free)
    prompts, prompt_mask, index = distinct_prompts(input_ids[:, :P], attention_mask[:, :P])
    return shared_prompt_logprobs(model, prompts, prompt_mask, input_ids[:, P:], attention_mask[:, P:], index,
                                  temperature=temperature)


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompt rows -> their U distinct rows (U, P) ids and (U, P) mask, and the (B,) long
    index of each row's distinct row. Rows are equal where their real tokens are (padding ids are ignored)."""
    key = prompt_ids.masked_fill(prompt_mask == 0, -1)
    prompts, index = torch.unique(key, dim=0, return_inverse=True)
    return prompts.clamp(min=0), (prompts >= 0).long(), index


@torch.no_grad()
def shared_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """A key/value cache of the (B, P) left-padded prompt rows' first P - 1 columns, each distinct prompt
    computed once (distinct_prompts) and its cache copied to every row that has it: what generation's
    prefill computes, at U * (P - 1) token positions instead of B * P. Hand it to
    `model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache)`, which then runs
    only the last prompt column before sampling (transformers' prompt-cache reuse). A GRPO group's samples
    share their prompt (hyperparameters.prefixSharing). Exactly one forward of the model, whatever the rows,
    so ZeRO-3 ranks stay in step; None (generate then runs its own prefill) when P < 2 or the model
    returns no cache.
    """
    prompts, mask, index = distinct_prompts(prompt_ids, prompt_mask)
    width = max(prompt_ids.shape[1] - 1, 1)
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=prompts[:, :width], attention_mask=mask[:, :width],
                position_ids=position_ids_from_mask(mask[:, :width]), use_cache=True, **keep)
    cache = getattr(out, "past_key_values", None)
    if prompt_ids.shape[1] < 2 or cache is None:
        return None
    cache.batch_select_indices(index.to(prompts.device))
    return cache
