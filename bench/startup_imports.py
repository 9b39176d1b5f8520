"""A trainer process's import of DeepSpeed, with and without its autotuner's optional `import mlflow`.

    python bench/startup_imports.py --repeats 7

Each measurement is a fresh interpreter that imports torch, transformers and DeepSpeed the way a role
process does at start-up: `plain` runs `import deepspeed`, `trainer` runs
rlhf_trainer.distributed.import_deepspeed (DeepSpeed's `import mlflow` refused, mlflow installed).
The two alternate, and the report gives medians of wall seconds and their ratio. Every role process
of every job pays this once per (re)start: three per PPO gang on the examples, several hundred per
CI run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

PROGRAMS = {
    "plain": "import torch, transformers, deepspeed",
    "trainer": ("import torch, transformers\n"
                "from rlhf_trainer.distributed import import_deepspeed\n"
                "import_deepspeed()"),
}


def seconds(program: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    seconds(PROGRAMS["plain"])  # warm the page cache
    for i in range(args.repeats):
        order = list(PROGRAMS) if i % 2 == 0 else list(reversed(PROGRAMS))
        for name in order:
            times[name].append(seconds(PROGRAMS[name]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{platform.machine()} {platform.system()}, python {platform.python_version()}, {args.repeats} repeats")
    for name, t in times.items():
        print(f"{name:8s} median {medians[name]:.2f} s  runs {' '.join(f'{x:.2f}' for x in t)}")
    print(f"saved per process: {medians['plain'] - medians['trainer']:.2f} s "
          f"(trainer / plain = {medians['trainer'] / medians['plain']:.2f})")


if __name__ == "__main__":
    main()
