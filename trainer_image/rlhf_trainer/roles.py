"""The serving roles (reference, reward, critic) and how the actor reaches them.

Each serving role is a small object with `handle(method, tensors, meta) -> (tensors, meta)`:

| op                   | in                                        | out                       |
|----------------------|-------------------------------------------|---------------------------|
| reference.logprobs   | input_ids, attention_mask (B, T)          | logprobs (B, T-1)         |
|                      | + meta response_length R                  | logprobs (B, R)           |
| reward.score         | meta prompts, responses (strings)         | scores (B,)               |
| reward.step_scores   | meta prompts, responses, separator        | scores (B, S), counts (B,)|
| critic.values        | input_ids, attention_mask (B, T), meta R  | values (B, R)             |
| critic.train         | + old_values, returns, action_mask (B, R) | meta value_loss           |

Response-aligned (B, R) tensors cover the last R columns: entry t is about token T-R+t, predicted
(log-prob) or valued (critic) from the state that ends at column T-R+t-1.

The actor calls them through a client: `LocalClient` when the role is colocated in the actor's own
processes (RLHF_COLOCATED_ROLES), `RemoteClient` over the bridge otherwise. A process of a serving
role runs `serve()`: it answers its actor ranks in a fixed order until each has said "stop"; "save"
checkpoints every role hosted by the process. Each answer carries the peak memory of the op (device
memory on GPU, RSS on CPU), which the actor's step log shows as `<role>_<op>_peak_memory_bytes`, and the
serving process's /metrics as its score (or, for critic.train, train) phase.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from rlhf_trainer import distributed
from rlhf_trainer.bridge import Bridge
from rlhf_trainer.data import pad_right, position_ids_from_mask
from rlhf_trainer.finite import NonFiniteGuard
from rlhf_trainer.forward import chunked_rows, chunked_token_logprobs, sequence_scores
from rlhf_trainer.losses.ppo import value_loss
from rlhf_trainer.tokenized import truncate_row

Tensors = dict[str, torch.Tensor]
Reply = tuple[Tensors, dict[str, Any]]
# The reply's meta key of the op's peak memory (bytes), and the metrics phase a served op counts in.
PEAK_MEMORY = "peak_memory_bytes"
SERVED_PHASES = {"train": "train"}  # the critic's update trains; every other op scores


def _on_device(tensors: Tensors) -> Tensors:
    dev = distributed.device()
    return {k: v.to(dev) for k, v in tensors.items()}


class ReferenceService:
    """The initial policy: log-probs for the KL penalty / DPO reference, `chunk_size` rows per pass.

    Either a frozen copy, or (adapters_off) a LoRA actor's own model run with its adapters disabled:
    its frozen base weights are the initial policy (rlhf_trainer.lora). That model keeps training, so
    its train/eval mode is restored after each call. `padding_free`: packed forwards
    (forward.packed_token_logprobs, hyperparameters.paddingFree); a call's `prefix_sharing` meta (rows
    in rollout layout, hyperparameters.prefixSharing): each distinct prompt of a chunk once.
    """

    def __init__(self, model, temperature: float, *, chunk_size: int, adapters_off: bool = False,
                 padding_free: bool = False):
        self.adapters_off = adapters_off
        self.padding_free = padding_free
        self.model = model if adapters_off else model.to(distributed.device()).eval()
        self.temperature = temperature
        self.chunk_size = chunk_size

    @torch.no_grad()
    def handle(self, method: str, tensors: Tensors, meta: dict) -> Reply:
        assert method == "logprobs", method
        t = _on_device(tensors)
        def logprobs_of(model):
            return chunked_token_logprobs(model, t["input_ids"], t["attention_mask"], chunk_size=self.chunk_size,
                                          temperature=self.temperature, response_length=meta.get("response_length") or 0,
                                          padding_free=self.padding_free, prefix_sharing=bool(meta.get("prefix_sharing")))

        if self.adapters_off:
            from rlhf_trainer.lora import adapters_off

            training = self.model.training
            self.model.eval()
            try:
                with adapters_off(self.model):
                    logprobs = logprobs_of(self.model)
            finally:
                self.model.train(training)
        else:
            logprobs = logprobs_of(self.model)
        return {"logprobs": logprobs}, {}


class RewardService:
    """A reward model scoring (prompt, response) pairs. It renders them itself with its own tokenizer
    (which may differ from the policy's) and its own chat template when it has one (`renderer`, an
    rlhf_trainer.chat.Renderer with template auto): rows are built as in RM training, prompt ids then
    response ids ending with a stop token, cut to max_prompt_length / max_length
    (rlhf_trainer.tokenized.truncate_row)."""

    def __init__(self, model, renderer, *, max_prompt_length: int, max_length: int, chunk_size: int,
                 padding_free: bool = False):
        self.model = model.to(distributed.device()).eval()
        self.padding_free = padding_free  # packed forwards (forward.sequence_scores, hyperparameters.paddingFree)
        self.renderer = renderer
        self.lengths = {"max_prompt_length": max_prompt_length, "max_length": max_length}
        self.chunk_size = chunk_size  # rows per forward

    @torch.no_grad()
    def handle(self, method: str, tensors: Tensors, meta: dict) -> Reply:
        assert method == "score", method
        prompts, responses = [], []
        for prompt, response in zip(meta["prompts"], meta["responses"], strict=True):
            prompt = prompt if isinstance(prompt, str) else tuple(prompt)  # JSON turned the tuple into a list
            p, r, _ = truncate_row(self.renderer.prompt_ids(prompt), self.renderer.response_ids(prompt, response),
                                   **self.lengths)
            prompts.append(p)
            responses.append(r)
        t = _on_device(pad_right(prompts, responses, self.renderer.tokenizer.pad_token_id))
        scores = chunked_rows(lambda ids, mask: sequence_scores(self.model, ids, mask, padding_free=self.padding_free),
                              t["input_ids"], t["attention_mask"], chunk_size=self.chunk_size, side="right")
        return {"scores": scores.cpu()}, {}


class ProcessRewardService:
    """A process reward model (an `algorithm: prm` export) scoring every step of (prompt, response)
    pairs in [-1, 1] at the step's separator. Rows are built as in PRM training (stepwise.encode_steps)
    with its own tokenizer and chat template (`renderer`, as RewardService's). Steps are the
    response's non-blank pieces between separators; a step whose separator falls beyond max_length
    scores 0."""

    def __init__(self, model, renderer, *, max_prompt_length: int, max_length: int):
        self.model = model.to(distributed.device()).eval()
        self.renderer = renderer
        self.lengths = {"max_prompt_length": max_prompt_length, "max_length": max_length}

    @torch.no_grad()
    def handle(self, method: str, tensors: Tensors, meta: dict) -> Reply:
        assert method == "step_scores", method
        from rlhf_trainer.losses.prm import step_scores
        from rlhf_trainer.stepwise import encode_steps, split_steps

        rows, positions = [], []
        for prompt, response in zip(meta["prompts"], meta["responses"], strict=True):
            prompt = prompt if isinstance(prompt, str) else tuple(prompt)  # JSON turned the tuple into a list
            steps = [s.text for s in split_steps(response, meta["separator"])]
            encoded = encode_steps(self.renderer.tokenizer, self.renderer.prompt_ids(prompt), steps,
                                   meta["separator"], **self.lengths)
            rows.append(encoded.ids)
            positions.append(encoded.positions + [-1] * (len(steps) - len(encoded.positions)))  # -1: cut off
        enc = pad_right([[] for _ in rows], rows, self.renderer.tokenizer.pad_token_id)
        dev = distributed.device()
        logits = self.model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                            position_ids=position_ids_from_mask(enc["attention_mask"]).to(dev)).logits
        per_token = step_scores(logits).cpu()
        counts = torch.tensor([len(p) for p in positions])
        scores = torch.zeros(len(rows), max(1, int(counts.max())))
        for i, row_positions in enumerate(positions):
            for k, position in enumerate(row_positions):
                if position >= 0:
                    scores[i, k] = per_token[i, position]
        return {"scores": scores, "counts": counts}, {}


class CriticService:
    """PPO critic: per-token values, and its own optimizer step on the actor's returns."""

    def __init__(self, strategy, *, micro_batch_size: int, chunk_size: int, value_clip_range: float,
                 normaliser: Callable, guard: NonFiniteGuard, padding_free: bool = False):
        self.strategy = strategy
        self.padding_free = padding_free  # packed forwards (models.ValueModel, hyperparameters.paddingFree)
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size  # rows per no-grad values pass
        self.value_clip_range = value_clip_range
        self.normaliser = normaliser  # local token count -> the global batch's normaliser
        self.guard = guard  # non-finite value loss / gradient norm (finite.py); meta "step" names the step

    def values(self, input_ids, attention_mask, response_length: int) -> torch.Tensor:
        """(B, R) values of the states before each response token."""
        values = self.strategy.forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
            padding_free=self.padding_free,
        )
        return values[:, -response_length - 1:-1].float()

    def handle(self, method: str, tensors: Tensors, meta: dict) -> Reply:
        t = _on_device(tensors)
        if method == "values":
            self.strategy.eval()
            with torch.no_grad():
                ids, mask, R = t["input_ids"], t["attention_mask"], meta["response_length"]
                values = chunked_rows(lambda i, m: self.values(i, m, R), ids, mask, chunk_size=self.chunk_size)
                return {"values": values}, {}
        assert method == "train", method
        self.strategy.train()
        t["action_mask"] = t["action_mask"].float()
        num_tokens = self.normaliser(float(t["action_mask"].sum()))
        self.guard.step = meta.get("step", self.guard.step)
        total = 0.0
        for start in range(0, t["input_ids"].shape[0], self.micro_batch_size):
            mb = {k: v[start : start + self.micro_batch_size] for k, v in t.items()}
            new_values = self.values(mb["input_ids"], mb["attention_mask"], mb["action_mask"].shape[1])
            loss = value_loss(
                new_values, mb["old_values"], mb["returns"], mb["action_mask"],
                clip_range=self.value_clip_range, num_tokens=num_tokens,
            )
            value = self.guard.backward_step(self.strategy, loss, anchor=new_values, role="critic",
                                             source="critic value loss")
            total += value or 0.0
        return {}, {"value_loss": total}


class Pending:
    """A request whose reply `result()` gives (read once, an error raised there). Deferred: the exchange
    runs at result(). Started (`Pending.started`): it runs on a thread of its own from now, so the caller
    goes on while the role works."""

    def __init__(self, exchange: Callable[[], Reply]):
        self._exchange, self._reply, self._error, self._thread = exchange, None, None, None

    @classmethod
    def started(cls, exchange: Callable[[], Reply], device: torch.device) -> Pending:
        pending = cls(exchange)
        ready = None
        if device.type == "cuda":  # what the caller's stream has queued (the request's tensors) comes first
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        pending._thread = threading.Thread(target=pending._run, args=(device, ready), daemon=True,
                                           name="role-request")
        pending._thread.start()
        return pending

    def _run(self, device: torch.device, ready) -> None:
        try:
            if ready is None:
                self._reply = self._exchange()
                return
            # A stream of its own: the caller's kernels do not queue behind the messages, nor they behind them.
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                self._reply = self._exchange()
            stream.synchronize()
        except BaseException as exc:  # raised in the caller's thread, at result()
            self._error = exc

    def result(self) -> Reply:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif self._reply is None and self._error is None:
            self._reply = self._exchange()
        if self._error is not None:
            raise self._error
        return self._reply


class LocalClient:
    """A role colocated in this process: a plain method call (replies stay on the device)."""

    def __init__(self, service):
        self.service = service

    def call(self, method: str, tensors: Tensors | None = None, **meta) -> Reply:
        return self.service.handle(method, tensors or {}, meta)

    def submit(self, method: str, tensors: Tensors | None = None, **meta) -> Pending:
        """call() when the result is asked for: in one process there is nothing to run beside the caller."""
        return Pending(lambda: self.call(method, tensors, **meta))


class RemoteClient:
    """A role in another process, reached over the bridge. `peaks` collects the highest peak memory each op
    reported since its owner last cleared it, as `<role>_<op>_peak_memory_bytes` (runtime.Context)."""

    def __init__(self, bridge: Bridge, role: str, dst: int, peaks: dict[str, float] | None = None):
        self.bridge, self.role, self.dst = bridge, role, dst
        self.peaks = {} if peaks is None else peaks

    def call(self, method: str, tensors: Tensors | None = None, **meta) -> Reply:
        self.bridge.send(self.dst, f"{self.role}.{method}", tensors, **meta)
        op, out, out_meta = self.bridge.recv(self.dst)
        if op == "error":
            raise RuntimeError(f"{self.role} (bridge rank {self.dst}) failed: {out_meta.get('message')}")
        peak = out_meta.pop(PEAK_MEMORY, None)
        if peak is not None:
            key = f"{self.role}_{method}_{PEAK_MEMORY}"
            self.peaks[key] = max(self.peaks.get(key, 0), peak)
        return out, out_meta

    def submit(self, method: str, tensors: Tensors | None = None, **meta) -> Pending:
        """call() on a thread of its own: the role works on the request while the caller goes on, as
        OpenRLHF's PPO trainer lets the critic fit while the actor trains (ppo_trainer.py). A thread, not a
        send now and a receive later: a serving rank answers its actor ranks in turn, and a reply to one
        (or another's request) would wait for a receive (a send) that comes only after the actors' own
        collective update, which waits for every actor rank. The caller sends nothing over the bridge
        before reading the result."""
        return Pending.started(lambda: self.call(method, tensors, **meta), self.bridge.device)


def serve(bridge: Bridge, services: dict[str, Any], actor_bridge_ranks: list[int], save: Callable[[int], None],
          metrics=None) -> None:
    """Answer the given actor processes until each sent "stop". With `metrics` (TrainerMetrics) each op is
    one observation of its phase (SERVED_PHASES) and its reply carries the op's peak memory (PEAK_MEMORY).

    Every actor rank issues the same sequence of calls per step, so answering them round-robin in a
    fixed order never deadlocks, and collective work inside this role's world (a ZeRO step of the
    critic, a checkpoint) happens on all of its ranks at the same time. `save(step)` runs once per
    step, on the first actor's request; the others just get the acknowledgement.
    """
    active = list(actor_bridge_ranks)
    saved_step = None
    while active:
        for src in list(active):
            op, tensors, meta = bridge.recv(src)
            if op == "stop":
                bridge.send(src, "ok")
                active.remove(src)
                continue
            if op == "save":
                if saved_step != meta["step"]:
                    save(meta["step"])
                    saved_step = meta["step"]
                bridge.send(src, "ok")
                continue
            role, _, method = op.partition(".")
            if role not in services:
                bridge.send(src, "error", message=f"this process serves {sorted(services)}, not {role!r}")
                raise RuntimeError(f"bridge rank {src} asked for {op!r}; this process serves {sorted(services)}")
            phase, observed = SERVED_PHASES.get(method, "score"), {}
            with metrics.phase(phase, observed) if metrics is not None else nullcontext():
                out, out_meta = services[role].handle(method, tensors, meta)
            if metrics is not None:
                out_meta = {**out_meta, PEAK_MEMORY: observed[f"{phase}_{PEAK_MEMORY}"]}
            bridge.send(src, "ok", out, **out_meta)
