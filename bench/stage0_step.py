"""The optimizer step of one ZeRO-0 engine (fp32) with DeepSpeed's gradient clipping and with the strategy's.

    python bench/stage0_step.py --repeats 7 --threads 1

At ZeRO stage 0 the strategy computes the global gradient norm itself (it must know a non-finite one
before the plain optimizer applies it). DeepSpeed's own fp32 clipping then computed that norm a second
time, all-reduced it and multiplied every gradient by the coefficient, 1.0 included.
`DeepSpeedStrategy.step()` now clips with the norm it has (and only when the coefficient is below 1).

Both variants run on one engine over a SmolLM2-135M-shaped Llama (random weights), alternating, each
time from the same gradients: `deepspeed` is the former step (strategy norm, then DeepSpeed's step and
its clipping), `strategy` is `DeepSpeedStrategy.step()`. `--clip on` scales the gradients to a norm of
10 (clipping to 1.0 scales them), `off` to 0.5 (nothing to scale). Reports medians of wall seconds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def smollm2_shaped() -> torch.nn.Module:
    from trainer_vs_trl import SHAPES  # bench/: the Trainer-vs-TRL bench's model shapes
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPES["smollm2-135m"][1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rlhf_contract.config import DeepSpeedConfig
    from rlhf_operator.localexec import free_port
    from rlhf_trainer.distributed import init_role_world
    from rlhf_trainer.strategy import DeepSpeedStrategy, gradient_norm

    init_role_world(master_addr="127.0.0.1", master_port=free_port(), rank=0, world_size=1)
    strategy = DeepSpeedStrategy(smollm2_shaped(), DeepSpeedConfig(zero_stage=0), learning_rate=1e-5,
                                 micro_batch_size=1, grad_accum=1)
    params = [p for p in strategy.module.parameters() if p.requires_grad]
    raw = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    raw_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw])))

    def former() -> None:
        gradient_norm(strategy.module.parameters())
        strategy.engine.step()

    variants = {"deepspeed": former, "strategy": strategy.step}
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters; {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s)")
    for clip, target in (("on", 10.0), ("off", 0.5)):
        grads = [g * (target / raw_norm) for g in raw]
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats + 1):  # the first round warms up
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
                start = time.perf_counter()
                variants[name]()
                if repeat:
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        print(f"clip {clip}: " + ", ".join(f"{name} {m:.3f} s" for name, m in medians.items())
              + f"; deepspeed / strategy {medians['deepspeed'] / medians['strategy']:.2f}x")


if __name__ == "__main__":
    main()
