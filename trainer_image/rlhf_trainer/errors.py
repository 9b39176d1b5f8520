"""Permanent trainer errors and their exit codes (docs/spec.md "Exit codes").

A ConfigError or DataError means restarting the gang cannot help, so `__main__` exits with the
matching code (rlhf_contract.wire) and the operator fails the job instead of retrying it.
ConfigError is the contract's: the config loader raises it.
"""

from rlhf_contract.config import ConfigError
from rlhf_contract.wire import EXIT_CONFIG_ERROR, EXIT_DATA_ERROR

__all__ = ["EXIT_CONFIG_ERROR", "EXIT_DATA_ERROR", "ConfigError", "DataError", "LayoutError"]


class LayoutError(ConfigError):
    """A checkpoint cannot be loaded under the current process layout (e.g. saved by 1 rank, resumed by 2,
    where DeepSpeed's universal checkpoint cannot reshard it): permanent, exit 78, never a retry loop."""


class DataError(ValueError):
    """A dataset file is invalid; the message names the file and line (`train.jsonl:7: ...`)."""

    kind = "data error"  # how `__main__` introduces the message (NonFiniteError: "non-finite value")
