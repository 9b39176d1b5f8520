"""Permanent trainer errors and their exit codes (docs/spec.md "Exit codes").

A ConfigError or DataError means restarting the gang cannot help, so `__main__` exits with the
matching code and the operator fails the job instead of retrying it.
"""

# sysexits.h: EX_DATAERR, EX_CONFIG (the operator's constants hold the same numbers).
EXIT_DATA_ERROR = 65
EXIT_CONFIG_ERROR = 78


class ConfigError(ValueError):
    """The trainer config is invalid; the message names the field path (`hyperparameters.beta: ...`)."""

    kind = "config error"  # how `__main__` introduces the message


class DataError(ValueError):
    """A dataset file is invalid; the message names the file and line (`train.jsonl:7: ...`)."""

    kind = "data error"
