"""Permanent trainer errors and their exit codes (docs/spec.md "Exit codes").

A ConfigError or DataError means restarting the gang cannot help, so `__main__` exits with the
matching code (rlhf_contract.wire) and the operator fails the job instead of retrying it.
ConfigError is the contract's: the config loader raises it.
"""

import re

from rlhf_contract.config import ConfigError
from rlhf_contract.wire import EXIT_CONFIG_ERROR, EXIT_DATA_ERROR

__all__ = ["EXIT_CONFIG_ERROR", "EXIT_DATA_ERROR", "ConfigError", "DataError", "LayoutError", "retryable_summary"]

# How gloo ("Timed out waiting 60000ms for send operation"), NCCL's watchdog ("collective operation
# timeout") and the TCPStore behind the bridge ("Timed out after 61 seconds", "wait timeout") say a peer
# did not answer in time.
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


class LayoutError(ConfigError):
    """A checkpoint cannot be loaded under the current process layout (e.g. saved by 1 rank, resumed by 2,
    where DeepSpeed's universal checkpoint cannot reshard it): permanent, exit 78, never a retry loop."""


class DataError(ValueError):
    """A dataset file is invalid; the message names the file and line (`train.jsonl:7: ...`)."""

    kind = "data error"  # how `__main__` introduces the message (NonFiniteError: "non-finite value")


def retryable_summary(exc: BaseException, timeout_seconds: int | None) -> str:
    """One line for the termination log of a process that fails retryably (exit 1: the gang restarts).

    A collective or bridge message that waited past hyperparameters.distributedTimeoutSeconds says so and
    names the knob (with its value when the config was read), since the error itself only names a socket;
    anything else is its type and the last line of its message. At most 1000 characters.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    if isinstance(exc, RuntimeError | TimeoutError) and _TIMEOUT.search(str(exc)):
        limit = f" ({timeout_seconds} s)" if timeout_seconds else ""
        detail = (f"a collective or bridge message waited longer than hyperparameters.distributedTimeoutSeconds"
                  f"{limit}: a rank of this role or of a role it exchanges with stopped answering (hung, killed or "
                  f"stopped; its own log says which); the gang restarts from the last checkpoint; {detail}")
    return detail[:1000]
