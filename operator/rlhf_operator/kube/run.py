"""`rlhf-operator operator`: run the kopf operator with the flags of cli.py."""

from __future__ import annotations

import argparse
import asyncio
import logging

from rlhf_operator.kube.config import OperatorConfig


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
