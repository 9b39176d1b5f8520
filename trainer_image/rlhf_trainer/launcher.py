"""The pod's entry point when it runs several trainer processes (roles[].processesPerPod > 1).

    python -m rlhf_trainer        # RLHF_PROCESSES_PER_POD=4 in the pod's env
      -> 4 x `python -m rlhf_trainer` with RLHF_LOCAL_RANK=0..3 (and torchrun's RANK, LOCAL_RANK, ...)

What torchrun does for one node of a static world, kept small: the ranks are known up front (pod
index x processes per pod + local rank: the operator numbers the pods), so no rendezvous is needed;
each process joins its role's world at the role's rank-0 address itself. The processes share the
launcher's process group (a local runner that kills the pod's group kills them too; in a container
they die with PID 1). The launcher forwards SIGTERM / SIGINT to them (a graceful stop: each saves
and exits 143) and, when one process fails, kills the others (their collectives would wait for the
dead one until the timeout) and exits with pod_exit_code(): a permanent code stays permanent,
anything else is retryable, so the operator's gang restart logic is unchanged.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from rlhf_contract import wire

POLL_SECONDS = 0.2


def child_env(env: Mapping[str, str], local_rank: int) -> dict[str, str]:
    """The env of local process `local_rank` of this pod: the pod's env plus RLHF_LOCAL_RANK and
    torchrun's names (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for
    libraries that read them. ValueError naming the variable when the pod's env is malformed."""
    from rlhf_trainer.distributed import read_process_env  # imports torch: only when launching

    out = {**env, wire.ENV_LOCAL_RANK: str(local_rank)}
    process = read_process_env(out)
    out.update(RANK=str(process.rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(process.world_size),
               LOCAL_WORLD_SIZE=str(process.processes_per_pod))
    if process.role in process.role_addrs:
        host, port = process.role_addrs[process.role]
        out.update(MASTER_ADDR=host, MASTER_PORT=str(port))
    return out


def exit_code(returncode: int) -> int:
    """Popen's returncode as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def pod_exit_code(codes: Sequence[int]) -> int:
    """The pod's exit code from its processes' exit codes, in the order they exited.

    0 when all succeeded; a permanent code (bad config / data) when any process had one, so the job
    fails instead of restarting; else the first failure's code (the cause: the processes killed
    after it are its consequence), e.g. 143 for a stop, 1 or 137 for a crash: both retryable.
    """
    codes = [exit_code(c) for c in codes]
    permanent = [c for c in codes if c in wire.PERMANENT_EXIT_CODES]
    if permanent:
        return permanent[0]
    return next((c for c in codes if c != 0), 0)


def run_pod(argv: Sequence[str], env: Mapping[str, str], processes: int) -> int:
    """Start `processes` copies of argv (local ranks 0..n-1), wait for all, return pod_exit_code()."""
    procs = [subprocess.Popen(list(argv), env=child_env(env, k)) for k in range(processes)]
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    codes: list[int] = []
    try:
        running = list(procs)
        while running:
            for proc in list(running):
                if proc.poll() is None:
                    continue
                running.remove(proc)
                codes.append(proc.returncode)
                if proc.returncode != 0 and not stopping and exit_code(proc.returncode) != wire.EXIT_STOPPED:
                    print(f"rlhf_trainer: local rank {procs.index(proc)} exited with {exit_code(proc.returncode)}; "
                          f"stopping the pod's other processes", file=sys.stderr, flush=True)
                    for other in running:
                        other.kill()
            time.sleep(POLL_SECONDS)
    finally:
        for proc in procs:  # an exception here (e.g. KeyboardInterrupt) must not orphan a process
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return pod_exit_code(codes)
