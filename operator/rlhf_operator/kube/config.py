"""The kopf operator's settings from the command line (cli.py), passed to the handlers in kopf's memo.

A module of its own so that run.py (which starts kopf with it) and handlers.py (which reads it)
both import it without importing each other.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from rlhf_operator.builders import BuildSettings
from rlhf_operator.constants import OPERATOR_METRICS_PORT


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the handlers need from the command line (kopf passes it to them in `memo`)."""

    # The trainer pods' settings, the trainer metrics port (read for status.progress) among them.
    build_settings: BuildSettings = field(default_factory=BuildSettings)
    metrics_port: int = OPERATOR_METRICS_PORT  # the operator's own /metrics; 0 = no metrics server
    progress_interval: float = 15.0
    workers: int = 16  # concurrent job reconciles
    concurrency: int = 32  # concurrent API requests (connections of the aiohttp session)
    resync_seconds: float = 60.0  # every job and its children listed afresh this often (Controller.resync)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OperatorConfig:
        return cls(
            build_settings=BuildSettings(trainer_service_account=args.trainer_service_account,
                                         default_gang_scheduler=args.default_gang_scheduler,
                                         trainer_metrics_port=args.trainer_metrics_port),
            metrics_port=args.metrics_port,
            progress_interval=getattr(args, "progress_interval", 15.0),
            workers=getattr(args, "workers", 16),
            concurrency=getattr(args, "api_concurrency", 32),
            resync_seconds=getattr(args, "resync_seconds", 60.0),
        )
