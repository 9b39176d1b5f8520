"""`rlhf-operator operator`: run the kopf operator with the flags of cli.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field

from rlhf_operator.builders import BuildSettings


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the handlers need from the command line (kopf passes it to them in `memo`)."""

    build_settings: BuildSettings = field(default_factory=BuildSettings)
    metrics_port: int = 8080  # 0 = no metrics server
    trainer_metrics_port: int = 9400
    progress_interval: float = 15.0
    workers: int = 16  # concurrent job reconciles
    concurrency: int = 32  # concurrent API requests (connections of the aiohttp session)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OperatorConfig:
        return cls(
            build_settings=BuildSettings(trainer_service_account=args.trainer_service_account,
                                         default_gang_scheduler=args.default_gang_scheduler,
                                         metrics_port=args.trainer_metrics_port),
            metrics_port=args.metrics_port,
            trainer_metrics_port=args.trainer_metrics_port,
            progress_interval=getattr(args, "progress_interval", 15.0),
            workers=getattr(args, "workers", 16),
            concurrency=getattr(args, "api_concurrency", 32),
        )


def configure_logging(level: str) -> None:
    """The operator's loggers at `level`. kopf says "Handler succeeded" at INFO for every watch event:
    its per-object lines stay at warnings and errors, whatever the level."""
    logging.getLogger("rlhf_operator").setLevel(level.upper())
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def main(args: argparse.Namespace) -> int:
    import kopf

    from rlhf_operator.kube import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=False)
    configure_logging(getattr(args, "log_level", "info"))
    memo = kopf.Memo(config=OperatorConfig.from_args(args))
    asyncio.run(kopf.operator(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=memo,
    ))
    return 0
