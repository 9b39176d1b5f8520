"""SCoRe (two-attempt self-correction RL, issue 14) against plain single-turn GRPO on the same budget, on CPU.

    python bench/score_demo.py                  # writes bench/RESULTS.md "SCoRe vs single-turn GRPO"
    python bench/score_demo.py --max-operand 4 --warm-steps 60 --no-write    # 25 sums

Task: synthetic://arithmetic?max_operand=N (--max-operand, default 2: "1+2=" -> "3", 9 sums), exact_match reward (1 right, 0.1 a
wrong number, 0 none), a tiny random Llama answering with one token per attempt, no chat template
(the environment's turn is the line "There might be an error in the solution above. Please correct
it."). Every run is an RLHFJob run by `rlhf-operator run-local`:
 0. warm start: single-turn GRPO for --warm-steps steps from the random model, so that the first
    attempt is sometimes right and sometimes wrong (SCoRe starts from a model that can solve some
    problems); both arms start from its export, which is also their KL reference;
 1. grpo: single-turn GRPO for --steps more steps;
 2. score: GRPO with turns 2 and selfCorrection score for the same --steps steps (stage I for the
    first third, stage II after; alpha 10, first-attempt KL 0.1 in stage I, klCoef 0.01 throughout),
    the same prompts per step, group size, learning rate and seed. It samples two attempts per
    prompt, so it generates about twice the tokens: the CPU seconds of each run are reported.
The arms run interleaved (grpo, score, grpo, score ...) over --seeds, because this shared machine's
speed drifts. Every export (and the warm start) is then evaluated the same way, two attempts per
prompt with the instruction between them (rlhf_trainer.multiturn.rollout): greedily on every sum,
and sampled at temperature 1 (8 samples per sum); reported are accuracy@t1, accuracy@t2, their
difference and the shares wrong->right and right->wrong (self_correction.correction_metrics).
Runs are kept under bench/out/score_demo/ (--fresh redoes them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "score_demo"
TASKS = "synthetic://arithmetic?max_operand={}"
METRICS = ("accuracy_t1", "accuracy_t2", "accuracy_delta", "wrong_to_right", "right_to_wrong")
COMMON = {"batchSize": 16, "microBatchSize": 128, "groupSize": 8, "maxNewTokens": 1, "maxPromptLength": 16,
          "learningRate": 2e-3, "klCoef": 0.01, "klEstimator": "k3", "sampleIntervalSteps": 0}


def manifest(name: str, model: str, task: str, hyperparameters: dict) -> dict:
    spec = {
        "algorithm": "grpo", "image": "local", "model": {"path": model},
        "reward": {"type": "rule", "rule": "exact_match"}, "dataset": {"path": task, "format": "prompts"},
        "roles": [{"name": "actor"}, {"name": "reference", "colocateWith": "actor"}],
        "hyperparameters": {**COMMON, **hyperparameters},
        "checkpoint": {"intervalSteps": 1000, "keep": 1, "volume": {"size": "1Gi"}},
        "scheduling": {"gangScheduler": "none"}, "failurePolicy": {"maxRestarts": 0, "backoffSeconds": 1},
    }
    return {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "metadata": {"name": name}, "spec": spec}


def run_job(job: dict, fresh: bool) -> tuple[Path, float | None]:
    """Run the manifest with run-local (unless its export exists): (checkpoint folder, CPU seconds of the run)."""
    name = job["metadata"]["name"]
    checkpoints = OUT / "runs" / name / "checkpoints"
    if (checkpoints / "export").is_dir() and not fresh:
        print(f"{name}: reusing {checkpoints / 'export'}", flush=True)
        return checkpoints, None
    path = OUT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "rlhf_operator.cli", "run-local", str(path), "--workdir", str(OUT / "runs"),
                    "--fresh", "--no-progress", "--no-metrics-server"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{name}: {time.monotonic() - t0:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return checkpoints, cpu


def evaluate(folder: Path, task: str, *, samples: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Two attempts per sum by the model at `folder` (instruction between them): greedy and sampled metrics."""
    import torch
    from rlhf_contract.config import Hyperparameters
    from rlhf_trainer import models
    from rlhf_trainer.chat import Renderer
    from rlhf_trainer.data import load_dataset
    from rlhf_trainer.multiturn import FixedInstruction, rollout
    from rlhf_trainer.rewards import CORRECT, exact_match
    from rlhf_trainer.self_correction import correction_metrics
    from rlhf_trainer.tokenized import PromptRow

    renderer = Renderer(models.load_tokenizer(str(folder)))
    model = models.load_policy(str(folder), seed=0).eval()
    records = {r.prompt: r.answer for r in load_dataset(task, "prompts", kind="prompts")}  # the distinct sums
    rows = [PromptRow(ids=renderer.prompt_ids(p), truncated=False, prompt=p, answer=a, source=p)
            for p, a in sorted(records.items())]
    hp = Hyperparameters(turns=2, max_new_tokens=COMMON["maxNewTokens"], inference_chunk_size=256)
    environment = FixedInstruction(hp.turn_instruction)
    out = {}
    for mode, batch, greedy in (("greedy", rows, True), ("sampled", [r for r in rows for _ in range(samples)], False)):
        torch.manual_seed(seed)
        roll = rollout(model, renderer, batch, hp, environment, greedy=greedy)
        answers = [r.answer for r in batch]
        scores = torch.tensor([exact_match([r.prompt for r in batch], [t[k] for t in roll.turn_responses], answers)
                               for k in range(2)]).T
        out[mode] = correction_metrics(scores, CORRECT)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-operand", type=int, default=2, help="sums of 0..N (synthetic://arithmetic)")
    parser.add_argument("--warm-steps", type=int, default=80)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--seeds", default="0,1", help="seeds of the two arms, comma separated")
    parser.add_argument("--samples", type=int, default=8, help="sampled attempts per sum in the evaluation")
    parser.add_argument("--fresh", action="store_true", help="redo runs whose export exists")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    task, tag = TASKS.format(args.max_operand), f"op{args.max_operand}-w{args.warm_steps}"
    warm, _ = run_job(manifest(f"score-warm-{tag}", "tiny://llama", task, {"maxSteps": args.warm_steps, "klCoef": 0.0}),
                      args.fresh)
    base = str(warm / "export")
    arms = {"grpo": {}, "score": {"turns": 2, "selfCorrection": "score", "scoreStageOneSteps": args.steps // 3,
                                  "scoreAlpha": 10.0, "scoreFirstTurnKlCoef": 0.1}}
    results: dict[str, list[dict]] = {"warm start": [evaluate(Path(base), task, samples=args.samples)]}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm, extra in arms.items():  # interleaved
            checkpoints, seconds = run_job(manifest(f"score-{tag}-{arm}-s{args.steps}-{seed}", base, task,
                                                    {"maxSteps": args.steps, "seed": seed, **extra}), args.fresh)
            if seconds is not None:
                cpu[arm].append(seconds)
            results.setdefault(arm, []).append(evaluate(checkpoints / "export", task, samples=args.samples))
    report = render(args, task, results, cpu, time.monotonic() - t_start)
    print(report)
    (OUT / f"results-{tag}.json").write_text(json.dumps({"results": results, "cpu": cpu}, indent=1))
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        from results_md import write_section

        write_section(HERE / "RESULTS.md", report)


def render(args, task: str, results: dict[str, list[dict]], cpu: dict[str, list[float]], seconds: float) -> str:
    lines = [
        "## SCoRe vs single-turn GRPO (issue 14)",
        "",
        f"`python bench/score_demo.py --max-operand {args.max_operand} --warm-steps {args.warm_steps} "
        f"--steps {args.steps} --seeds {args.seeds}` "
        f"({platform.machine()}, {os.cpu_count()} cores shared, CPU only, {seconds / 60:.0f} min in all). Tiny random "
        f"Llama on `{task}` ({(args.max_operand + 1) ** 2} sums), exact_match reward, one token per attempt, no chat template. Both arms start "
        f"from the same warm start (single-turn GRPO, {args.warm_steps} steps from random) and run {args.steps} steps "
        "of 16 prompts x 8 samples, lr 2e-3, klCoef 0.01 against the warm start; score = turns 2, selfCorrection "
        f"score, stage I steps 1..{args.steps // 3}, alpha 10, first-attempt KL 0.1 in stage I. Evaluation: two "
        "attempts per sum with the instruction between them, greedy over every sum once and sampled at temperature 1 "
        f"({args.samples} per sum); mean over seeds {args.seeds} (each seed's value in brackets).",
        "",
        "| model | mode | accuracy@t1 | accuracy@t2 | delta(t1,t2) | wrong->right | right->wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        for mode in ("greedy", "sampled"):
            cells = []
            for key in METRICS:
                values = [r[mode][key] for r in runs]
                each = f" [{', '.join(f'{v:.2f}' for v in values)}]" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.2f}{each}")
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "CPU seconds per run (trainer processes): " + "; ".join(
        f"{arm} {statistics.median(v):.0f} (median of {len(v)})" for arm, v in cpu.items() if v) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
