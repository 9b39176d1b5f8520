"""DeepSpeed behind one object: the algorithm loops never call `deepspeed.*` themselves.

`build_ds_config()` is pure (tested as a table); `DeepSpeedStrategy` wraps one trainable model in a
DeepSpeed engine with a torch AdamW (DeepSpeed's own CPU Adam needs a ~60 s compile) and does
backward / step / save / load / export. The role's own torch.distributed world is
started before (distributed.init_role_world).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from rlhf_contract.config import DeepSpeedConfig

from rlhf_trainer.distributed import import_deepspeed


def build_ds_config(
    *,
    zero_stage: int,
    bf16: bool,
    offload_optimizer: bool,
    micro_batch_size: int,
    grad_accum: int,
    gradient_clipping: float = 1.0,
    world_size: int = 1,
) -> dict[str, Any]:
    """The DeepSpeed config dict for one engine. Pure: same arguments, same dict.

    The optimizer is NOT in the dict: the strategy passes a torch AdamW, so DeepSpeed never compiles
    its CPU Adam. `train_batch_size` is given explicitly so DeepSpeed checks our arithmetic.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage: expected 0..3, got {zero_stage}")
    if micro_batch_size < 1 or grad_accum < 1 or world_size < 1:
        raise ValueError(
            f"micro_batch_size, grad_accum and world_size must be >= 1, got {micro_batch_size}, {grad_accum}, {world_size}"
        )
    if offload_optimizer and zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        # pin_memory is pointless (and fails) without an accelerator.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        # Tiny models: keep no parameter persistent, so every parameter really goes through ZeRO-3.
        zero["stage3_param_persistence_threshold"] = 0
        # export() needs the full 16-bit weights gathered on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        # DeepSpeed refuses a client optimizer with offload unless told: ours is torch's fused AdamW,
        # which steps the offloaded fp32 partitions on the CPU without DeepSpeedCPUAdam's compile.
        config["zero_force_ds_cpu_optimizer"] = False
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def needs_synced_generation(zero_stage: int, world_size: int) -> bool:
    """Whether sampling must keep the ranks of a world in step until all are done.

    Under ZeRO-3 every forward gathers each layer's parameters with a collective of the whole
    world, so a rank whose samples all ended must keep running forwards while another still
    samples (transformers' `generate(synced_gpus=True)`, which DeepSpeed-Chat and OpenRLHF pass
    under ZeRO-3); stages 0-2 hold whole parameters on every rank and need no such lockstep.
    """
    return zero_stage == 3 and world_size > 1


def needs_gradient_allreduce(zero_stage: int, world_size: int) -> bool:
    """Whether DeepSpeed's backward must run its gradient all-reduce.

    Alone in its world at ZeRO stage 0 there is nothing to average, yet DeepSpeed still flattens
    every gradient into buckets, "all-reduces" them and copies them back (a third of a 135M
    model's optimizer step on CPU, bench/RESULTS.md); stages 1-3 reduce inside their optimizer,
    which also moves gradients into its partitions, so they always keep it.
    """
    return not (zero_stage == 0 and world_size == 1)


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step: its global gradient norm (before clipping; None when DeepSpeed computes
    none) and whether the weights were updated."""

    grad_norm: float | None
    applied: bool


def gradient_norm(parameters) -> float:
    """The 2-norm of every .grad of `parameters` (inf or nan when one is not finite; 0.0 if none)."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def clip_gradients(parameters, norm: float, max_norm: float) -> None:
    """Scale every .grad of `parameters` by min(1, max_norm / (norm + 1e-6)), `norm` being their
    global 2-norm, in place; nothing to do when that is 1. The coefficient is computed in fp32 as
    DeepSpeed's runtime.utils.clip_grad_norm_ and torch.nn.utils.clip_grad_norm_ compute it."""
    coef = torch.tensor(max_norm, dtype=torch.float32) / (torch.tensor(norm, dtype=torch.float32) + 1e-6)
    if coef >= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef.item())


class DeepSpeedStrategy:
    """One trainable model in a DeepSpeed engine.

    The loop computes each micro-batch loss already normalised over the whole optimizer step
    (`num_tokens` in losses/), so `backward()` does not divide by the accumulation steps again.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        settings: DeepSpeedConfig,
        *,
        learning_rate: float,
        micro_batch_size: int,
        grad_accum: int,
        gradient_clipping: float = 1.0,
        weight_decay: float = 0.0,
    ):
        deepspeed = import_deepspeed()
        self.settings = settings
        self.learning_rate = learning_rate
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.config = build_ds_config(
            zero_stage=settings.zero_stage,
            bf16=settings.bf16,
            offload_optimizer=settings.offload_optimizer,
            micro_batch_size=micro_batch_size,
            grad_accum=grad_accum,
            gradient_clipping=gradient_clipping,
            world_size=self.world_size,
        )
        if settings.gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        params = [p for p in model.parameters() if p.requires_grad]
        # A LoRA model's frozen base is not saved in checkpoints (it is the model folder's).
        self.frozen = len(params) < len(list(model.parameters()))
        # fused: one kernel over all parameters instead of ~10 ops per tensor (CPU and CUDA).
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95),
                                      fused=all(p.is_floating_point() for p in params))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.engine.enable_backward_allreduce = needs_gradient_allreduce(settings.zero_stage, self.world_size)
        self.last_step: StepOutcome | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def synced_generation(self) -> bool:
        """Pass as generate's synced_gpus (needs_synced_generation for this engine's world)."""
        return needs_synced_generation(self.settings.zero_stage, self.world_size)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepOutcome | None:
        """Steps the optimizer at the accumulation boundary (DeepSpeed counts micro-batches).

        Returns None between boundaries; at a boundary, the step's gradient norm and whether the
        weights were updated. A non-finite gradient never updates them: ZeRO 1-3 skip such a step
        themselves (DeepSpeed's overflow check; it reports the norm as inf), and at ZeRO-0, whose
        plain optimizer would apply it, the gradients are dropped first (a torch optimizer leaves a
        parameter without .grad alone).
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        own_norm = None
        if boundary and self.settings.zero_stage == 0:
            # ZeRO-0 has all-reduced the gradients in the boundary's backward: the norm is global.
            own_norm = gradient_norm(self.engine.module.parameters())
        if own_norm is None:
            self.engine.step()
        else:
            if not math.isfinite(own_norm):
                for param in self.engine.module.parameters():
                    param.grad = None  # the optimizer finds no gradient to apply
            elif self._clips_fp32_gradients():
                clip_gradients(self.engine.module.parameters(), own_norm, self.engine.gradient_clipping())
            # DeepSpeed's fp32 clipping would compute the norm a second time (and, with no gradient
            # left, index an empty list): the step above did its work.
            self.engine.clip_fp32_gradients = lambda: None
            try:
                self.engine.step()  # counts the boundary
            finally:
                del self.engine.clip_fp32_gradients
        if not boundary:
            return None
        norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        applied = self.engine.was_step_applied() and (norm is None or math.isfinite(norm))
        self.last_step = StepOutcome(grad_norm=norm, applied=applied)
        return self.last_step

    def _clips_fp32_gradients(self) -> bool:
        """Whether DeepSpeed's step would clip the fp32 gradients itself (engine._take_model_step):
        with 16-bit weights or ZeRO its optimizer clips them instead."""
        engine = self.engine
        return engine.gradient_clipping() > 0 and not (
            engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        """Collective over the role's world: every rank writes its shard under `directory/engine`."""
        self.engine.save_checkpoint(directory, tag="engine", client_state=client_state, save_latest=False,
                                    exclude_frozen_parameters=self.frozen)

    def load(self, directory: str) -> dict[str, Any]:
        """Collective; returns the client state given to save(). Raises if the files do not load."""
        path, client_state = self.engine.load_checkpoint(directory, tag="engine", load_module_strict=not self.frozen)
        if path is None:
            raise FileNotFoundError(f"{directory}/engine: no DeepSpeed checkpoint")
        self.apply_learning_rate()
        return client_state or {}

    def apply_learning_rate(self) -> None:
        """The configured learning rate over the one a checkpoint restored with the optimizer state: an edit
        of hyperparameters.learningRate, rolled out as a gang restart, takes effect (there is no schedule)."""
        inner = getattr(self.optimizer, "optimizer", None)
        for optimizer in (self.optimizer, inner):
            for group in getattr(optimizer, "param_groups", None) or []:
                group["lr"] = self.learning_rate

    def load_universal(self, directory: str) -> None:
        """Collective: load a DeepSpeed universal checkpoint (checkpoint.to_universal's output) saved under
        another data-parallel world size or ZeRO stage; DeepSpeed reshards weights and optimizer states."""
        config = self.engine._config  # DeepSpeed reads the flag from its config at load time
        config.load_universal_checkpoint = True
        try:
            path, _ = self.engine.load_checkpoint(directory, load_module_strict=not self.frozen)
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed universal checkpoint")
        self.apply_learning_rate()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere); collective under ZeRO-3."""
        if self.settings.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def optimizer_state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer moments and fp32 master weights, flattened, for equality checks."""
        out: dict[str, torch.Tensor] = {}
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for i, (param, state) in enumerate(inner.state.items()):
            out[f"param.{i}"] = param.detach().float().cpu().clone()
            for key, value in state.items():
                if torch.is_tensor(value):
                    out[f"state.{i}.{key}"] = value.detach().float().cpu().clone()
        return out


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Toggle activation checkpointing on a HF model or on a wrapper holding one as `.backbone`."""
    target = model if hasattr(model, "gradient_checkpointing_enable") else getattr(model, "backbone", None)
    if target is None or not hasattr(target, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if enabled:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_disable()
