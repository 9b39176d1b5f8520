"""How much matrix arithmetic one training step does, ours against TRL's, and how fast it runs.

    python bench/step_flops.py --model smollm2-135m --steps 2            # DPO, GRPO and PPO, both sides
    python bench/step_flops.py --model smollm2-135m --only dpo --prefix-sharing

Each measurement is one fresh process running bench/trainer_vs_trl.py's step (the same model, rows,
batch and settings as that bench) under torch.profiler with `with_flops`, one thread. It reports, per
step: the floating-point operations of the matrix multiplies (aten::mm / addmm / bmm, which the profiler
counts; attention's fused kernels are not counted, a few percent at these lengths), the median step's
wall time, the CPU seconds those multiplies took (one thread: wall seconds too), their share of the
step, and the rate they ran at. The first step counts like the others (no warm-up).

Why: at 100-odd token positions per pass a step is the same sequence of weight-shaped multiplies on both
sides. If both do the same operations at the same rate, no framework change makes one 1.3x faster than
the other; only doing fewer operations (computing a shared prompt once, packing rows, keeping logits
only where a loss reads them) does. This measures which case a configuration is in.

TRL's PPO runs in its own venv (trl 1.12, `--trl-ppo-python`); it is profiled there by the same code.
The profiler keeps every event of the run in memory: TRL's GRPO on long uneven rows (`--context-tokens
96 --ragged`, 12.8 GiB without it) does not fit a 23 GiB machine under it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import trainer_vs_trl as bench  # noqa: E402 (the bench's directory first)

# The profiler's events that count floating-point operations: the matrix multiplies.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")

PROFILE_WRAPPER = r'''
import json, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
torch.set_num_threads(1)
ops = set(sys.argv.pop(1).split(","))
script = sys.argv.pop(1)
start, cpu0 = time.perf_counter(), time.process_time()
with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
    exec(compile(script, "<profiled>", "exec"), {"__name__": "__main__"})
events = [e for e in prof.key_averages() if e.key in ops]
print("FLOPS " + json.dumps({"flops": sum(e.flops for e in events),
                             "matmul_cpu_s": sum(e.self_cpu_time_total for e in events) / 1e6}))
'''

OURS_OR_TRL_SCRIPT = r'''
import sys
sys.path.insert(0, {bench_dir!r})
import trainer_vs_trl as bench
bench.PROMPTS = {prompts}
import json
if {side!r} == "ours":
    result = bench.run_ours({algorithm!r}, {steps}, 0, "cpu", {model!r}, False, {prefix_sharing}, {context_tokens},
                   {padding_free}, {ragged})
else:
    result = bench.run_trl({algorithm!r}, {steps}, 0, "cpu", {model!r}, False, {context_tokens}, {ragged})
print("RESULT " + json.dumps({{"times": [result["step_s"]]}}))
'''


def measure(side: str, algorithm: str, args) -> dict:
    """One fresh process: `args.steps` steps (no warm-up: operations, not seconds, are the figure) under
    the profiler. Returns per step: flops and matmul CPU seconds (totals over the run / steps) and
    step_s, the median step's wall time (ours and TRL's DPO / GRPO: the bench's median; TRL's PPO: its
    steps' median), all under the profiler's per-operation overhead."""
    model = bench.model_path(args.model)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if side == "trl" and algorithm == "ppo":
        python = args.trl_ppo_python
        script = bench.TRL_PPO_SCRIPT
        additions, script_args = bench.trl_ppo_invocation(args.steps, 0, "cpu", model, args.context_tokens, args.ragged)
        env.update(additions)
    else:
        python = sys.executable
        script = OURS_OR_TRL_SCRIPT.format(
            bench_dir=str(HERE), prompts=bench.PROMPTS, side=side, algorithm=algorithm, steps=args.steps, model=model,
            prefix_sharing=args.prefix_sharing, context_tokens=args.context_tokens, padding_free=args.padding_free,
            ragged=args.ragged)
        script_args = []
    cmd = [python, "-c", PROFILE_WRAPPER, ",".join(MATMUL_OPS), script, *script_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = {tag: [line[len(tag) + 1:] for line in proc.stdout.splitlines() if line.startswith(tag + " ")]
             for tag in ("FLOPS", "RESULT")}
    if proc.returncode or not all(found.values()):
        raise RuntimeError(f"{side}-{algorithm} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    totals = json.loads(found["FLOPS"][-1])
    times = json.loads(found["RESULT"][-1]).get("times")
    return {**{key: value / args.steps for key, value in totals.items()}, "step_s": statistics.median(times)}


def report(rows: list[tuple[str, str, dict]]) -> str:
    """A markdown table: per algorithm and side, GFLOP per step, matmul seconds, share and rate."""
    lines = ["| algorithm | side | matmul GFLOP / step | step s | matmul s / step | matmul share of the step | matmul GFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for algorithm, side, r in rows:
        lines.append(f"| {algorithm} | {side} | {r['flops'] / 1e9:.1f} | {r['step_s']:.2f} | {r['matmul_cpu_s']:.2f} | "
                     f"{r['matmul_cpu_s'] / r['step_s']:.0%} | {r['flops'] / 1e9 / r['matmul_cpu_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=bench.MODELS, default="smollm2-135m")
    p.add_argument("--only", choices=bench.ALGOS, action="append")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=bench.DEFAULT_PROMPTS)
    p.add_argument("--prefix-sharing", action="store_true")
    p.add_argument("--padding-free", action="store_true")
    p.add_argument("--context-tokens", type=int, default=0)
    p.add_argument("--ragged", action="store_true")
    p.add_argument("--trl-ppo-python", default=str(HERE / "out" / "trl112" / "bin" / "python"))
    args = p.parse_args()
    bench.PROMPTS = args.prompts
    rows = []
    for algorithm in args.only or bench.ALGOS:
        for side in ("ours", "trl"):
            start = time.perf_counter()
            rows.append((algorithm, side, measure(side, algorithm, args)))
            print(f"{side}-{algorithm}: {rows[-1][2]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(report(rows))


if __name__ == "__main__":
    main()
