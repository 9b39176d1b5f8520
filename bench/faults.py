"""Fault-injection benchmark: many trials of "kill a random role process at a random moment, several
times over one run" through the local runner (the real builders and planner decide every restart).

    python bench/faults.py                       # real trainer, crds/examples/ppo-tiny.yaml
    python bench/faults.py --trials 20 --kills 3 --trainer fake   # restart machinery alone, seconds

Per trial it checks that the job still finished every requested step with exactly one gang restart
per kill and that no restart redid more than one checkpoint interval; it measures the restart
latency (kill -> every pod of the next gang started) and the resume latency (kill -> the actor's
first metrics line after it: process start, model load, checkpoint load). The summary replaces the
"## Fault injection" section of bench/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from results_md import write_section
from rlhf_operator import local, localfaults

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = REPO / "tests" / "integration" / "local_fake_trainer.py"
SECTION = "## Fault injection"  # one section per trainer: "## Fault injection — real trainer"


def manifest(path: Path, max_steps: int, interval: int, kills: int) -> dict:
    obj = yaml.safe_load(path.read_text())
    obj["spec"]["hyperparameters"]["maxSteps"] = max_steps
    obj["spec"]["checkpoint"]["intervalSteps"] = interval
    obj["spec"]["failurePolicy"] = {"maxRestarts": kills, "backoffSeconds": 1}
    return obj


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.2f} s, p90 {pct(values, 0.9):.2f} s, max {max(values):.2f} s"


def run_trials(args: argparse.Namespace) -> list[localfaults.TrialResult]:
    obj = manifest(Path(args.manifest), args.max_steps, args.interval, args.kills)
    fake = args.trainer == "fake"
    results = []
    with tempfile.TemporaryDirectory(prefix="rlhf-faults-") as work:
        for trial in range(args.trials):
            runner = local.LocalRunner(
                obj, Path(work) / str(trial), trainer_command=[sys.executable, str(FAKE_TRAINER)] if fake else None,
                extra_env={"FAKE_STEP_SECONDS": "0.05"} if fake else None, serve_metrics=False, stop_grace=5)
            r = localfaults.run_with_kills(runner, args.kills, random.Random(args.seed + trial),
                                           max_delay=args.max_delay, timeout=args.timeout)
            results.append(r)
            print(f"trial {trial}: {'ok' if r.ok() else 'FAILED'} phase={r.phase} step={r.final_step}/{r.max_steps} "
                  f"kills={len(r.kills)} restarts={r.restarts} redone={r.steps_redone} "
                  f"restart={[round(x, 2) for x in r.gang_restart_s]} resume={[round(x, 2) for x in r.resume_s]} "
                  f"wall={r.wall_s:.1f}s {r.error}", flush=True)
    return results


def summary(args: argparse.Namespace, results: list[localfaults.TrialResult]) -> str:
    ok = sum(r.ok() for r in results)
    kills = sum(len(r.kills) for r in results)
    redone = [x for r in results for x in r.steps_redone]
    restart = [x for r in results for x in r.gang_restart_s]
    resume = [x for r in results for x in r.resume_s]
    trainer = "fake trainer (tests/integration/local_fake_trainer.py, 0.05 s/step)" if args.trainer == "fake" \
        else f"real trainer, {Path(args.manifest).name}"
    return "\n".join([
        f"{SECTION} — {args.trainer} trainer",
        "",
        f"`python bench/faults.py --trainer {args.trainer} --trials {args.trials} --kills {args.kills} "
        f"--max-steps {args.max_steps} --interval {args.interval}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()} {platform.system()}, {trainer}; backoffSeconds 1 (doubles per restart).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| trials that finished every step, one restart per kill, ≤ 1 interval redone | {ok} / {len(results)} |",
        f"| kills / gang restarts | {kills} / {sum(r.restarts for r in results)} |",
        f"| steps redone per resume (interval {args.interval}) | "
        f"{'max ' + str(max(redone)) + ', mean ' + format(statistics.mean(redone), '.2f') if redone else 'none'} |",
        f"| restart latency: kill -> next gang's pods all started (backoff + the planner's settle wait for the other pods to exit) | {fmt(restart)} |",
        f"| resume latency: kill -> first new metrics line | {fmt(resume)} |",
        f"| wall time per trial | {fmt([r.wall_s for r in results])} |",
        "",
        "A restart can start sooner than backoffSeconds after the kill: the planner counts the backoff from",
        "the Restarting condition's lastTransitionTime, an RFC3339 time with 1 s resolution. Steps redone",
        "are counted from the actor's metrics file (a resume that lands exactly on a checkpoint redoes none).",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO / "crds" / "examples" / "ppo-tiny.yaml"))
    parser.add_argument("--trainer", choices=["real", "fake"], default="real")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--max-delay", type=float, default=2.0, help="random wait after progress, seconds")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    if args.trainer == "fake":
        # 0.05 s per step: enough steps and short waits that every kill lands mid-run
        args.max_steps = max(args.max_steps, 30)
        args.max_delay = min(args.max_delay, 0.3)
    results = run_trials(args)
    text = summary(args, results)
    print(text)
    write_section(Path(args.results), text)
    return 0 if all(r.ok() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
