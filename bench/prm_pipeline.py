"""The process-reward pipeline of issue 16 on CPU: label -> train a PRM -> PPO with dense step rewards and
a critic initialised from the PRM (DenseReward + ValueInit), against PPO with the outcome reward alone.

    python bench/prm_pipeline.py                    # writes bench/RESULTS.md "PRM pipeline vs outcome-only PPO"
    python bench/prm_pipeline.py --no-write --ppo-steps 20 --seeds 0

Every stage is an RLHFJob run by `rlhf-operator run-local` (the export of one stage is the model of the
next), on a tiny random Llama and the synthetic task `a+b+c+d=` answered with one partial sum per line
("3+4+2+1=" -> "7\\n9\\n10"), whose lines a rule can check:
 0. sft: a few steps on synthetic://partial_sum_solutions, so the policy writes the format and still
    gets sums wrong;
 1. prm-label: the sft policy answers synthetic://partial_sums; each response's first wrong line is
    found by binary search, a prefix counting as right when one of 4 completions from it ends on the
    right sum (exact_match, the last number);
 2. prm: a process reward model trained on those labels;
 3. ppo-outcome: PPO from the sft policy with exact_match only; ppo-prm: the same job with
    reward.type prm (the PRM's step scores as dense rewards, normalizeSteps, exact_match as the
    outcome) and critic.model reward (ValueInit: the critic starts from the PRM). Same steps, batch,
    learning rate and seed for both arms.
Measured: each PPO step's outcome reward (mean exact_match of the batch), and on held-out prompts
(problems absent from the training prompts) the greedy pass rate and the share with every line right.
Stage outputs are kept under bench/out/prm_pipeline/ and reused by later runs (--fresh redoes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "prm_pipeline"
TASK = "operands=4&max_operand=4"
TRAIN_PROMPTS = f"synthetic://partial_sums?{TASK}&size=256"
NEW_TOKENS = 12


def manifest(name: str, algorithm: str, model: str, dataset: dict, hyperparameters: dict, *, roles=("actor",),
             reward: dict | None = None, reward_model: str | None = None, critic: dict | None = None) -> dict:
    spec = {
        "algorithm": algorithm, "image": "local", "model": {"path": model}, "dataset": dataset,
        "roles": [{"name": r, **({"colocateWith": "actor"} if r != "actor" else {})} for r in roles],
        "hyperparameters": {"maxPromptLength": 32, "maxLength": 64, **hyperparameters},
        "checkpoint": {"intervalSteps": 1000, "keep": 1, "volume": {"size": "1Gi"}},
        "scheduling": {"gangScheduler": "none"}, "failurePolicy": {"maxRestarts": 0, "backoffSeconds": 1},
    }
    if reward:
        spec["reward"] = reward
    if reward_model:
        spec["rewardModel"] = {"path": reward_model}
    if critic:
        spec["critic"] = critic
    return {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "metadata": {"name": name}, "spec": spec}


def run_job(job: dict, fresh: bool) -> Path:
    """Run the manifest with run-local (unless its export exists) and return its checkpoint folder."""
    name = job["metadata"]["name"]
    checkpoints = OUT / "runs" / name / "checkpoints"
    if (checkpoints / "export").is_dir() and not fresh:
        print(f"{name}: reusing {checkpoints / 'export'}", flush=True)
        return checkpoints
    path = OUT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "rlhf_operator.cli", "run-local", str(path), "--workdir", str(OUT / "runs"),
                    "--fresh", "--no-progress", "--no-metrics-server"], check=True)
    print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    return checkpoints


def metrics(checkpoints: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoints / "metrics" / "actor-0.jsonl").read_text().splitlines()]


def held_out_prompts(n: int) -> list[tuple[str, list[int]]]:
    """Problems of the task that are not among the training prompts: (prompt, partial sums)."""
    from rlhf_trainer.data import load_dataset
    from rlhf_trainer.stepwise import synthetic_partial_sum_solutions

    seen = {r.prompt for r in load_dataset(TRAIN_PROMPTS, "auto", kind="prompts")}
    out = []
    for record in synthetic_partial_sum_solutions(size=4000, operands=4, max_operand=4, seed=987):
        if record.prompt not in seen and record.prompt not in {p for p, _ in out}:
            out.append((record.prompt, [int(x) for x in record.response.split("\n")]))
        if len(out) == n:
            break
    return out


def evaluate(folder: Path, problems) -> dict[str, float]:
    """Greedy answers of the exported policy: pass rate (last number right) and all-lines-right rate."""
    import torch
    from rlhf_trainer import models
    from rlhf_trainer.rewards import exact_match_score

    tokenizer, model = models.load_tokenizer(str(folder)), models.load_policy(str(folder), seed=0).eval()
    passed = all_lines = 0
    with torch.no_grad():
        for prompt, partial in problems:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            passed += exact_match_score(text, str(partial[-1])) == 1.0
            all_lines += [line.strip() for line in text.strip().split("\n")] == [str(p) for p in partial]
    return {"pass_rate": passed / len(problems), "all_lines_right": all_lines / len(problems)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--label-steps", type=int, default=16)
    parser.add_argument("--prm-steps", type=int, default=150)
    parser.add_argument("--ppo-steps", type=int, default=60)
    parser.add_argument("--seeds", default="0,1", help="PPO seeds, comma separated (both arms each)")
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--fresh", action="store_true", help="redo stages whose export exists")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    sft = run_job(manifest("pipe-sft", "sft", "tiny://llama",
                           {"path": f"synthetic://partial_sum_solutions?{TASK}&size=256"},
                           {"maxSteps": args.sft_steps, "batchSize": 32, "microBatchSize": 32, "learningRate": 1e-3}),
                  args.fresh)
    label = run_job(manifest("pipe-label", "prm-label", str(sft / "export"), {"path": TRAIN_PROMPTS},
                             {"maxSteps": args.label_steps, "batchSize": 16, "microBatchSize": 16, "groupSize": 2,
                              "maxNewTokens": NEW_TOKENS, "prmCompletions": 4},
                             reward={"type": "rule", "rule": "exact_match"}), args.fresh)
    labels = [json.loads(line) for line in (label / "export" / "prm_labels.jsonl").read_text().splitlines()]
    prm = run_job(manifest("pipe-prm", "prm", "tiny://llama",
                           {"path": str(label / "export" / "prm_labels.jsonl"), "format": "stepwise"},
                           {"maxSteps": args.prm_steps, "batchSize": 32, "microBatchSize": 32, "learningRate": 5e-4}),
                  args.fresh)

    ppo_hp = {"maxSteps": args.ppo_steps, "batchSize": 32, "microBatchSize": 32, "maxNewTokens": NEW_TOKENS,
              "learningRate": 5e-4, "klCoef": 0.02, "truncationPenalty": 0.2}
    arms = {
        "outcome": {"reward": {"type": "rule", "rule": "exact_match"}, "reward_model": None,
                    "roles": ("actor", "critic", "reference")},
        "prm": {"reward": {"type": "prm", "rule": "exact_match", "normalizeSteps": True},
                "critic": {"model": "reward"}, "reward_model": str(prm / "export"),
                "roles": ("actor", "critic", "reference", "reward")},
    }
    problems = held_out_prompts(args.held_out)
    results = {"sft": evaluate(sft / "export", problems)}
    curves: dict[str, list[list[float]]] = {arm: [] for arm in arms}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm, setup in arms.items():  # interleaved: the machine's speed drifts
            job = manifest(f"pipe-ppo-{arm}-{seed}", "ppo", str(sft / "export"), {"path": TRAIN_PROMPTS},
                           {**ppo_hp, "seed": seed}, roles=setup["roles"], reward=setup["reward"],
                           reward_model=setup["reward_model"], critic=setup.get("critic"))
            checkpoints = run_job(job, args.fresh)
            curves[arm].append([row["reward_mean"] for row in metrics(checkpoints)])
            results[f"{arm}-{seed}"] = evaluate(checkpoints / "export", problems)

    prm_rows = metrics(prm)
    report = render(args, labels, prm_rows, results, curves, time.monotonic() - t_start)
    print(report)
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        from results_md import write_section

        write_section(HERE / "RESULTS.md", report)


def _mean_of_windows(curve: list[float], windows: int = 6) -> list[float]:
    size = max(1, len(curve) // windows)
    return [statistics.mean(curve[i:i + size]) for i in range(0, size * windows, size) if curve[i:i + size]]


def render(args, labels, prm_rows, results, curves, seconds) -> str:
    steps_labelled = sum(len(r["labels"]) for r in labels)
    wrong = sum(1 for r in labels if False in r["labels"])
    last = prm_rows[-10:]
    lines = [
        "## PRM pipeline vs outcome-only PPO (issue 16)",
        "",
        "`python bench/prm_pipeline.py` (CPU, tiny random Llama, shared 2-core machine; "
        f"{seconds / 60:.0f} min for all stages). Task: `a+b+c+d=` (operands 0..4) answered one partial "
        "sum per line; the outcome reward is exact_match on the last line. Stages: sft "
        f"({args.sft_steps} steps) -> prm-label ({args.label_steps} steps x 16 prompts x 2 responses, best of 4 "
        f"completions per prefix) -> prm ({args.prm_steps} steps) -> PPO {args.ppo_steps} steps x 32 prompts from the "
        "sft policy, outcome-only vs reward.type prm + exact_match outcome + normalizeSteps + ValueInit (critic.model reward) "
        "(same seed, lr 5e-4, klCoef 0.02, truncationPenalty 0.2).",
        "",
        f"- prm-label wrote {len(labels)} rows ({steps_labelled} labelled lines); {wrong} rows have a wrong line.",
        f"- prm, last 10 training steps: step accuracy {statistics.mean(r['step_accuracy'] for r in last):.2f}, "
        f"first-wrong-step accuracy {statistics.mean(r['first_wrong_step_accuracy'] for r in last):.2f}.",
        "",
        f"Held-out prompts ({args.held_out} problems not among the training prompts), greedy decoding:",
        "",
        "| policy | pass rate | every line right |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['pass_rate']:.2f} | {r['all_lines_right']:.2f} |")
    lines += ["", "Training outcome reward (batch mean exact_match), mean per sixth of the run:", "",
              "| arm | seed | curve |", "|---|---|---|"]
    for arm, per_seed in curves.items():
        for seed, curve in zip(args.seeds.split(","), per_seed, strict=True):
            lines.append(f"| {arm} | {seed} | {' '.join(f'{v:.2f}' for v in _mean_of_windows(curve))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
