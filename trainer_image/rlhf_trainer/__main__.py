"""`python -m rlhf_trainer`: one role process of an RLHFJob (docs/spec.md "Env contract"), or, in a pod
with RLHF_PROCESSES_PER_POD > 1, the launcher of that many (rlhf_trainer.launcher).

Exit codes: 0 done; 78 bad config (ConfigError), 65 bad data (DataError, and NonFiniteError: a NaN /
inf reward, loss or gradient norm under hyperparameters.non_finite fail) — permanent, the message
goes to stderr and to the termination log so `kubectl describe pod` shows it; 143 told to stop
(SIGTERM) and stopped after its step, with a last checkpoint when it fit in the grace period; anything
else propagates (exit 1): the operator retries the gang from the last complete checkpoint, and the
termination log holds one line saying why (errors.retryable_summary: a process-group timeout names
hyperparameters.distributedTimeoutSeconds).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

from rlhf_contract import wire

from rlhf_trainer.errors import EXIT_CONFIG_ERROR, EXIT_DATA_ERROR, ConfigError, DataError, retryable_summary
from rlhf_trainer.stopping import Stopped


def write_termination_message(message: str, env: dict[str, str]) -> None:
    """Best effort: the kubelet shows this file's content as the container's termination message."""
    path = env.get(wire.ENV_TERMINATION_LOG, wire.TERMINATION_LOG)
    try:
        with open(path, "w") as f:
            f.write(message[:4000])  # the kubelet keeps at most 4096 bytes
    except OSError:
        pass


def launches(env: dict[str, str]) -> bool:
    """Whether this is a pod's entry point that starts several processes (rather than one of them)."""
    return wire.ENV_LOCAL_RANK not in env and env.get(wire.ENV_PROCESSES_PER_POD, "").strip() not in ("", "1")


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    # `kill -USR1 <pid>` prints every thread's stack: the way to see where a hung role waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    config = None
    try:
        if launches(env):
            from rlhf_trainer import launcher

            try:  # the env is checked once, before anything starts
                processes = int(launcher.child_env(env, 0)["LOCAL_WORLD_SIZE"])
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            return launcher.run_pod([sys.executable, "-m", "rlhf_trainer"], env, processes)
        from rlhf_contract.config import load_config

        from rlhf_trainer.distributed import read_process_env

        try:
            process = read_process_env(env)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        config = load_config(process.config_path)
        from rlhf_trainer.runtime import run

        run(process, config)
    except Stopped as exc:
        print(f"rlhf_trainer: {exc}", file=sys.stderr, flush=True)
        return wire.EXIT_STOPPED
    except (ConfigError, DataError) as exc:
        code, kind = (EXIT_CONFIG_ERROR, "config error") if isinstance(exc, ConfigError) else (EXIT_DATA_ERROR, exc.kind)
        message = f"rlhf_trainer: {kind}: {exc}"
        print(message, file=sys.stderr, flush=True)
        write_termination_message(message, env)
        return code
    except Exception as exc:  # retryable: exit 1 and a gang restart, with the reason where describe shows it
        timeout = config.hyperparameters.distributed_timeout_seconds if config is not None else None
        write_termination_message(f"rlhf_trainer: {retryable_summary(exc, timeout)}", env)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
