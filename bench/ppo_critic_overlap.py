"""PPO with the critic in its own pod: this checkout's trainer against another commit's.

    python bench/ppo_critic_overlap.py --before <commit> --repeats 3

The actor used to ask the critic to train only after its own policy update, and wait; it now sends the
request first (roles.RemoteClient.submit), so the critic's update runs while the actor's does.

Each measurement is one `rlhf-operator run-local` of the same manifest (this checkout's runner), its pods
running the trainer of one checkout (`git worktree` of `--before`, or this one) through
`--trainer-command`: PPO on a SmolLM2-135M-shaped Llama (random weights, fp32; bench/trainer_vs_trl.py's
model folder), the reference and the reward model (the same weights) in the actor's pod, the critic in
a pod of its own, one intra-op thread per pod; `--prompts` arithmetic prompts per step, 8 new tokens,
one PPO epoch, one micro-batch, ZeRO stage 0. The two checkouts alternate; the report gives the median
over repeats of each run's median step and train phase (steps after the first) and their ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from checkouts import against_commit  # bench/
from trainer_vs_trl import model_path  # bench/: the SmolLM2-135M-shaped model folder


def manifest(model: str, prompts: int, steps: int) -> dict:
    one_cpu = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    return {
        "apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "metadata": {"name": "bench-ppo-critic"},
        "spec": {
            "algorithm": "ppo", "image": "ghcr.io/rlhf-operator/trainer:0.1.0-cpu",
            "model": {"path": model}, "rewardModel": {"path": model}, "reward": {"type": "model"},
            "dataset": {"path": "synthetic://arithmetic?max_operand=2", "format": "prompts"},
            "roles": [
                {"name": "actor", "resources": one_cpu, "deepspeed": {"zeroStage": 0}},
                {"name": "critic", "resources": one_cpu, "deepspeed": {"zeroStage": 0}},
                {"name": "reference", "colocateWith": "actor"},
                {"name": "reward", "colocateWith": "actor"},
            ],
            "hyperparameters": {"maxSteps": steps, "batchSize": prompts, "microBatchSize": prompts,
                                "maxPromptLength": 16, "maxNewTokens": 8, "ppoEpochs": 1,
                                "oldLogProbs": "sampling", "learningRate": 1.0e-6},
            "checkpoint": {"intervalSteps": 1000, "keep": 1, "volume": {"size": "1Gi"}},
            "scheduling": {"gangScheduler": "none"},
            "failurePolicy": {"maxRestarts": 0, "backoffSeconds": 1},
        },
    }


def measure(code: Path, manifest_path: Path, workdir: Path) -> dict:
    trainer = ["env", f"PYTHONPATH={code / 'trainer_image'}:{code / 'contract'}", sys.executable, "-m", "rlhf_trainer"]
    subprocess.run([sys.executable, "-m", "rlhf_operator.cli", "run-local", str(manifest_path), "--workdir",
                    str(workdir), "--fresh", "--no-progress", "--no-metrics-server",
                    "--trainer-command", shlex.join(trainer)], check=True, capture_output=True, text=True)
    path = workdir / "bench-ppo-critic" / "checkpoints" / "metrics" / "actor-0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r][1:]  # the first step warms up
    return {key: statistics.median(r[key] for r in rows) for key in ("step_seconds", "train_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model = model_path("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        manifest_path = Path(tmp) / "ppo.yaml"
        manifest_path.write_text(yaml.safe_dump(manifest(model, args.prompts, args.steps)))
        results = against_commit(args.before, args.repeats,
                                 lambda code: measure(code, manifest_path, Path(tmp) / "runs"))
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in results.items()}
    print(f"{platform.machine()}, PPO, {args.prompts} prompts per step, critic in its own pod: "
          f"step before {med['before']['step_seconds']:.2f} s, now {med['now']['step_seconds']:.2f} s "
          f"({med['before']['step_seconds'] / med['now']['step_seconds']:.2f}x); "
          f"train phase before {med['before']['train_seconds']:.2f} s, now {med['now']['train_seconds']:.2f} s "
          f"({med['before']['train_seconds'] / med['now']['train_seconds']:.2f}x)")


if __name__ == "__main__":
    main()
