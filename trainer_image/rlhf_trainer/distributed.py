"""Who this process is (the env contract of docs/spec.md) and its role's own torch.distributed world.

One world per role: ZeRO-3 in a world shared with other roles deadlocks on its world-wide barriers,
so roles talk to each other only over the bridge (bridge.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from rlhf_contract import wire


@dataclass(frozen=True)
class ProcessEnv:
    """The RLHF_* environment of one role process (names: rlhf_contract.wire)."""

    job: str
    role: str
    rank: int  # in the role's world: pod index x processes_per_pod + local_rank
    world_size: int  # the role's ranks: pods x processes_per_pod
    colocated_roles: tuple[str, ...]
    config_path: str
    role_addrs: dict[str, tuple[str, int]]
    bridge_addr: tuple[str, int] | None
    checkpoint_dir: str
    restart_attempt: int
    metrics_port: int
    pod_ip: str
    termination_grace: float = 30.0  # seconds from SIGTERM to SIGKILL (RLHF_TERMINATION_GRACE_SECONDS)
    local_rank: int = 0  # this process among its pod's (RLHF_LOCAL_RANK)
    processes_per_pod: int = 1  # RLHF_PROCESSES_PER_POD

    @property
    def pods(self) -> int:
        return self.world_size // self.processes_per_pod

    @property
    def pod_index(self) -> int:
        return self.rank // self.processes_per_pod


def _int(env: dict[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name, "")
    if raw == "" and default is not None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def read_process_env(env: dict[str, str]) -> ProcessEnv:
    """Parse the env contract of one trainer process; a missing or malformed variable raises
    ValueError naming it.

    The pod's index (RLHF_ROLE_RANK) and count (RLHF_ROLE_REPLICAS), its processes
    (RLHF_PROCESSES_PER_POD) and this one's local rank (RLHF_LOCAL_RANK, 0 when absent) give the
    rank in the role's world, pod index x processes per pod + local rank, as torchrun numbers them;
    the /metrics port is RLHF_METRICS_PORT + local rank (0 stays 0: no endpoint).
    """
    for name in (wire.ENV_ROLE, wire.ENV_CONFIG, wire.ENV_CHECKPOINT_DIR):
        if not env.get(name):
            raise ValueError(f"{name}: required environment variable is not set")
    bridge = env.get(wire.ENV_BRIDGE_ADDR, "")
    colocated = env.get(wire.ENV_COLOCATED_ROLES, "")
    per_pod = _int(env, wire.ENV_PROCESSES_PER_POD, 1)
    local = _int(env, wire.ENV_LOCAL_RANK, 0)
    if per_pod < 1:
        raise ValueError(f"{wire.ENV_PROCESSES_PER_POD}: must be at least 1, got {per_pod}")
    if not 0 <= local < per_pod:
        raise ValueError(f"{wire.ENV_LOCAL_RANK}: {local} is not in 0..{per_pod - 1} ({wire.ENV_PROCESSES_PER_POD})")
    metrics_port = _int(env, wire.ENV_METRICS_PORT, 0)
    return ProcessEnv(
        job=env.get(wire.ENV_JOB, ""),
        role=env[wire.ENV_ROLE],
        rank=_int(env, wire.ENV_ROLE_RANK, 0) * per_pod + local,
        world_size=_int(env, wire.ENV_ROLE_REPLICAS, 1) * per_pod,
        colocated_roles=tuple(r.strip() for r in colocated.split(",") if r.strip()),
        config_path=env[wire.ENV_CONFIG],
        role_addrs=wire.parse_role_addrs(env.get(wire.ENV_ROLE_ADDRS, "")),
        bridge_addr=wire.parse_addr(bridge, wire.ENV_BRIDGE_ADDR) if bridge else None,
        checkpoint_dir=env[wire.ENV_CHECKPOINT_DIR],
        restart_attempt=_int(env, wire.ENV_RESTART_ATTEMPT, 0),
        metrics_port=metrics_port + local if metrics_port else 0,
        pod_ip=env.get(wire.ENV_POD_IP, ""),
        termination_grace=_int(env, wire.ENV_TERMINATION_GRACE, 30),
        local_rank=local,
        processes_per_pod=per_pod,
    )


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def import_deepspeed():
    """`import deepspeed` without the optional `import mlflow` of DeepSpeed's autotuner
    (deepspeed/autotuning/autotuner.py, which the trainer never runs): with mlflow installed (the
    trackers extra) that import is about a third of a trainer process's start-up (bench/RESULTS.md).
    mlflow imports as usual afterwards (spec.trackers)."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    blocked = "mlflow" not in sys.modules
    if blocked:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError there, which DeepSpeed catches
    try:
        import deepspeed
    finally:
        if blocked and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
    return deepspeed


def init_role_world(*, master_addr: str, master_port: int, rank: int, world_size: int, local_rank: int = 0,
                    timeout: timedelta = timedelta(minutes=30)) -> None:
    """Start this role's own torch.distributed world through DeepSpeed (idempotent).

    A collective that waits longer than `timeout` fails the process (hyperparameters.
    distributed_timeout_seconds; torch's own NCCL default, 10 minutes, is shorter than a long phase).

    DeepSpeed reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* from the environment (else it goes
    looking for MPI), so they are set here from the RLHF env contract.
    """
    if dist.is_initialized():
        return
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
        }
    )
    deepspeed = import_deepspeed()

    # On CPU DeepSpeed compiles a shared-memory all-reduce op on first init (~33 s); gloo suffices.
    # (importlib: `import deepspeed.comm.torch as m` would bind the real torch, re-exported by the package.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=default_backend(), timeout=timeout, verbose=False)


def world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(value: float) -> float:
    """Sum a number over the role's world (identity with one process)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], device=device(), dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` summed over the role's world (a copy of `t` with one process); differentiable inputs
    are detached: this is for statistics, never for gradients."""
    out = t.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


def role_barrier() -> None:
    if world_size() > 1:
        dist.barrier()
