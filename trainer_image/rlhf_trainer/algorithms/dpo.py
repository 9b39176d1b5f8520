"""Preference optimisation on fixed pairs: DPO (Rafailov et al. 2023) and its variants IPO (Azar et
al. 2023), hinge (SLiC), cDPO label smoothing; and the reference-free SimPO (Meng et al. 2024), ORPO
(Hong et al. 2024) and CPO (Xu et al. 2024), which have no reference role.

One step: the reference role's log-probs of chosen and rejected responses (DPO only), then per
micro-batch the policy's log-probs and the preference loss (losses.dpo / simpo / orpo) on sequence
log-probs, summed or token-averaged as the loss defines them. No sampling.

With `prefixSharing` the policy's forward computes each pair's prompt once, both responses after it
in one row whose attention mask keeps them apart (forward.shared_prompt_logprobs; Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing"): the same log-probs at fewer token
positions. The
reference role gets the pairs' rows side by side in rollout layout (shared_rows) and computes each
chunk's distinct prompts once too (forward.chunked_token_logprobs with prefix_sharing).

ORPO and CPO add the chosen responses' negative log-likelihood (per chosen-response token over the
global batch, losses.sft's normaliser), weighted 1 (ORPO's L_SFT, eq. 6) or `cpoAlpha` (CPO, Xu et al.
2024 eq. 5 "L_prefer + L_NLL"; TRL's CPOTrainer `cpo_alpha`).
"""

from __future__ import annotations

import torch

from rlhf_trainer import distributed
from rlhf_trainer.algorithms.common import (
    ActorAlgorithm,
    encode_pairs,
    global_normaliser,
    pair_slices,
    run_algorithm,
)
from rlhf_trainer.data import pad_left, pad_right
from rlhf_trainer.forward import shared_mask_honoured, shared_prompt_logprobs, token_logprobs
from rlhf_trainer.losses.dpo import DPOOutput, dpo_loss, preference_logprobs
from rlhf_trainer.losses.orpo import odds_ratio_loss
from rlhf_trainer.losses.simpo import simpo_loss
from rlhf_trainer.runtime import Context
from rlhf_trainer.tokenized import PairRow


def response_columns(loss_mask: torch.Tensor) -> int:
    """(N, T) right-padded loss mask -> R: the last R columns hold every row's response tokens.

    Log-probs (and the vocabulary-wide logits behind them) are computed for those columns only,
    not for the prompts before them; at least 1 and at most T - 1 (token 0 is never predicted).
    """
    first = int(loss_mask.long().argmax(-1).min())
    return min(max(loss_mask.shape[1] - first, 1), loss_mask.shape[1] - 1)


def chosen_nll_weight(kind: str, hp) -> float:
    """Weight of the chosen responses' NLL term added to the preference loss: ORPO's L_SFT has weight 1
    (Hong et al. 2024 eq. 6), CPO's L_NLL `cpoAlpha` (Xu et al. 2024 eq. 5; TRL's cpo_alpha); 0 otherwise."""
    return {"orpo": 1.0, "cpo": hp.cpo_alpha}.get(kind, 0.0)


class DPO(ActorAlgorithm):
    def __init__(self, ctx: Context, renderer):
        super().__init__(ctx, renderer, rows_per_sample=2)  # a pair is two rows: chosen and rejected
        hp = self.hp
        # The loss that defines the sequence log-probs: DPO's loss type, or the algorithm itself.
        self.kind = hp.loss_type if ctx.cfg.algorithm == "dpo" else ctx.cfg.algorithm
        self.reference = ctx.client("reference") if ctx.cfg.algorithm == "dpo" else None

    def step(self, records, timings) -> dict[str, float]:
        hp, metrics, n = self.hp, self.ctx.metrics, len(records)
        batch = {k: v.to(distributed.device()) for k, v in encode_pairs(records, self.tokenizer.pad_token_id).items()}
        attn, loss_mask = batch["attention_mask"], batch["loss_mask"]
        R = response_columns(loss_mask)
        ref = None
        if self.reference is not None:
            with metrics.phase("score", timings):
                ref = self.reference_logprobs(records, batch, R)
            if not self.ctx.guard.batch_ok("experience", {"ref_logprobs": ref.view(2, n).T}, records,
                                           source="the reference forward (chosen, rejected)"):
                return {"tokens": 0.0}
        pairs_total = global_normaliser(n)
        nll_weight = chosen_nll_weight(self.kind, hp)
        chosen_tokens = global_normaliser(float(loss_mask[:n, 1:].sum())) if nll_weight else 1.0
        losses, correct, margins = [], 0.0, []
        with metrics.phase("train", timings):
            self.strategy.train()
            for rows in pair_slices(n, hp.micro_batch_size):
                half = len(rows) // 2
                logprobs, mask = self.policy_logprobs([records[int(i)] for i in rows[:half]], batch, rows, R)
                logp = preference_logprobs(logprobs, mask, self.kind)
                out = self.preference_loss(logp[:half], logp[half:], None if ref is None else ref[rows])
                # The losses average over their pairs; rescale to a share of the whole batch's mean.
                loss = out.loss * half / pairs_total
                if nll_weight:
                    chosen_mask = mask[:half, -logprobs.shape[1]:].to(logprobs.dtype)
                    loss = loss - nll_weight * (logprobs[:half] * chosen_mask).sum() / chosen_tokens
                source = f"dpo ({hp.loss_type}) loss" if self.ctx.cfg.algorithm == "dpo" else f"{self.kind} loss"
                value = self.ctx.guard.backward_step(
                    self.strategy, loss, anchor=logp, role="actor", source=source,
                    records=[records[int(i)] for i in rows[:half]])
                losses.append(value or 0.0)
                correct += float(out.accuracy) * half
                margins.append(float((out.chosen_rewards - out.rejected_rewards).mean()))
        return {
            "policy_loss": sum(losses), "loss": sum(losses), "preference_accuracy": correct / n,
            "reward_mean": sum(margins) / len(margins), "tokens": float(attn.sum()),
        }

    def policy_logprobs(self, pairs: list[PairRow], batch: dict[str, torch.Tensor], rows: torch.Tensor,
                        R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's (2P, C) token log-probs of a micro-batch's chosen then rejected responses, with
        the (2P, >= C) mask whose last C columns mark their response tokens (preference_logprobs' inputs):
        prefix-shared when on and every prompt has a token, else over `batch`'s rows, last R columns."""
        if self.hp.prefix_sharing:  # its first call runs forwards: on every rank, whatever its pairs (ZeRO-3)
            shared_mask_honoured(self.strategy.forward)
        if self.hp.prefix_sharing and all(p.prompt for p in pairs):
            shared = encode_shared_prompt(pairs, self.tokenizer.pad_token_id)
            dev = distributed.device()
            pair_of_row = torch.arange(len(pairs), device=dev).repeat(2)  # chosen rows, then rejected rows
            logprobs = shared_prompt_logprobs(self.strategy.forward, *(shared[k].to(dev) for k in SHARED_KEYS),
                                              pair_of_row)[0]
            return logprobs, shared["response_mask"].to(dev)
        logprobs = token_logprobs(self.strategy.forward, batch["input_ids"][rows], batch["attention_mask"][rows],
                                  response_length=R, padding_free=self.hp.padding_free)[0]
        return logprobs, batch["loss_mask"][rows]

    def reference_logprobs(self, pairs: list[PairRow], batch: dict[str, torch.Tensor], R: int) -> torch.Tensor:
        """The reference's (2P,) sequence log-probs of the pairs (chosen then rejected): with prefix sharing,
        rows in rollout layout, each pair's two responses side by side so that a chunk computes their prompt
        once (shared_rows); else `batch`'s rows, last R columns."""
        if self.hp.prefix_sharing and all(p.prompt for p in pairs):
            rows, mask, order = shared_rows(encode_shared_prompt(pairs, self.tokenizer.pad_token_id))
            dev = batch["input_ids"].device
            side_by_side = self.reference.call("logprobs", rows, response_length=mask.shape[1],
                                               prefix_sharing=True)[0]["logprobs"].to(dev)
            logprobs = torch.empty_like(side_by_side)
            logprobs[order.to(dev)] = side_by_side  # back to chosen rows, then rejected rows
            return preference_logprobs(logprobs, mask.to(dev), self.kind)
        ref_logprobs = self.reference.call("logprobs", {"input_ids": batch["input_ids"],
                                                        "attention_mask": batch["attention_mask"]},
                                           response_length=R)[0]["logprobs"]
        return preference_logprobs(ref_logprobs.to(batch["input_ids"].device), batch["loss_mask"], self.kind)

    def preference_loss(self, chosen, rejected, ref) -> DPOOutput:
        """(P,) sequence log-probs of a micro-batch's pairs (and (2P,) reference ones for DPO)."""
        hp = self.hp
        if self.kind == "simpo":
            return simpo_loss(chosen, rejected, beta=hp.beta, gamma=hp.simpo_gamma, label_smoothing=hp.label_smoothing)
        if self.kind == "orpo":
            return odds_ratio_loss(chosen, rejected, beta=hp.beta)
        if self.kind == "cpo":  # eq. 3 on summed log-probs: SimPO's loss with no margin
            return simpo_loss(chosen, rejected, beta=hp.beta, gamma=0.0, label_smoothing=hp.label_smoothing)
        half = len(chosen)
        return dpo_loss(chosen, rejected, ref[:half], ref[half:], beta=hp.beta, loss_type=hp.loss_type,
                        label_smoothing=hp.label_smoothing)


SHARED_KEYS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


def encode_shared_prompt(pairs: list[PairRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pairs -> forward.shared_prompt_logprobs' inputs: prompt_ids / prompt_mask (P, Tp) left-padded, and
    response_ids / response_mask (2P, Tr) right-padded, chosen rows first (encode_pairs' order)."""
    prompts = pad_left([p.prompt for p in pairs], pad_token_id)
    responses = pad_right([()] * (2 * len(pairs)), [p.chosen for p in pairs] + [p.rejected for p in pairs],
                          pad_token_id)
    return {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"],
            "response_ids": responses["input_ids"], "response_mask": responses["attention_mask"]}


def shared_rows(shared: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """encode_shared_prompt's blocks -> rows in rollout layout ((2P, Tp + Tr) input_ids / attention_mask: the
    left-padded prompt, then the right-padded response) ordered chosen 0, rejected 0, chosen 1, ..., the
    (2P, Tr) response mask in encode_pairs' order (chosen rows, then rejected), and `order`: (2P,) the
    encode_pairs row of each side-by-side row."""
    pairs = shared["prompt_ids"].shape[0]
    order = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], 1).flatten()
    prompt = order % pairs
    rows = {"input_ids": torch.cat([shared["prompt_ids"][prompt], shared["response_ids"][order]], 1),
            "attention_mask": torch.cat([shared["prompt_mask"][prompt], shared["response_mask"][order]], 1)}
    return rows, shared["response_mask"], order


def run(ctx: Context) -> None:
    run_algorithm(ctx, DPO)
