"""`rlhf-operator`: one console script, three subcommands.

    rlhf-operator run-local crds/examples/ppo-tiny.yaml   # the embedded default: no cluster
    rlhf-operator report runs/ppo-tiny                    # PNG curves + text summary of a run
    rlhf-operator operator --namespace team-a             # the kopf operator (in-cluster)

Each subcommand's module is imported only when chosen, so `report` needs no kopf and `operator`
needs no matplotlib.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_contract import wire

from rlhf_operator.constants import OPERATOR_METRICS_PORT


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-operator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    local = sub.add_parser("run-local", help="run an RLHFJob manifest on this machine, no cluster")
    local.add_argument("manifest", help="RLHFJob YAML file (the same one kubectl apply takes)")
    local.add_argument("--workdir", default="runs", help="runs/<job>/ holds config, checkpoints, logs")
    local.add_argument("--fresh", action="store_true", help="delete an earlier run's folder first")
    local.add_argument("--no-progress", action="store_true", help="plain log lines instead of bars")
    local.add_argument("--no-metrics-server", action="store_true",
                       help="RLHF_METRICS_PORT=0: trainers serve no /metrics (the JSONL files still fill)")
    local.add_argument("--suspend-after-step", type=int, default=0, metavar="N",
                       help="test hook: suspend once step N is reached, resume when the pods are gone")
    local.add_argument("--trainer-command", default="", metavar="CMD",
                       help="run CMD instead of the pods' `python -m rlhf_trainer` (e.g. a development trainer)")

    report = sub.add_parser("report", help="plot a run's metrics (PNG) and print a summary")
    report.add_argument("run_dir", help="a run folder (runs/<job>) or a checkpoint directory")
    report.add_argument("--out", default="", help="PNG path (default: <run_dir>/report.png)")

    op = sub.add_parser("operator", help="run the kopf operator against the current cluster")
    op.add_argument("--namespace", action="append", default=[],
                    help="namespace to watch (repeatable); none = all namespaces")
    op.add_argument("--default-gang-scheduler", default="none",
                    choices=["volcano", "coscheduling", "none"],
                    help="gang scheduler for jobs that do not choose one")
    op.add_argument("--trainer-service-account", default="rlhf-trainer",
                    help="service account of trainer pods (it needs no API permissions)")
    op.add_argument("--metrics-port", type=int, default=OPERATOR_METRICS_PORT, help="operator /metrics port")
    op.add_argument("--trainer-metrics-port", type=int, default=wire.TRAINER_METRICS_PORT,
                    help="port of the trainer's /metrics, read for status.progress")
    op.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf liveness endpoint")
    op.add_argument("--progress-interval", type=float, default=15.0,
                    help="seconds between progress reads of a running job's trainer")
    op.add_argument("--workers", type=int, default=16, help="jobs reconciled concurrently")
    op.add_argument("--api-concurrency", type=int, default=32, help="concurrent API requests")
    op.add_argument("--resync-seconds", type=positive_seconds, default=60.0,
                    help="seconds between resyncs: every job and its children are listed afresh and reconciled, "
                         "so an object deleted while a watch was away is seen gone within this interval")
    op.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="the operator's own log level (debug: one line per reconcile pass and its actions)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run-local":
        from rlhf_operator import local

        return local.main(args)
    if args.command == "report":
        from rlhf_operator import report

        return report.main(args)
    from rlhf_operator.kube import run

    return run.main(args)


if __name__ == "__main__":
    sys.exit(main())
