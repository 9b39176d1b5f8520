"""Who this process is (the env contract of docs/spec.md) and its role's own torch.distributed world.

One world per role: ZeRO-3 in a world shared with other roles deadlocks on its world-wide barriers,
so roles talk to each other only over the bridge (bridge.py).
"""

from __future__ import annotations

import importlib
import os
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
    rank: int
    replicas: int
    colocated_roles: tuple[str, ...]
    config_path: str
    role_addrs: dict[str, tuple[str, int]]
    bridge_addr: tuple[str, int] | None
    checkpoint_dir: str
    restart_attempt: int
    metrics_port: int
    pod_ip: str
    termination_grace: float = 30.0  # seconds from SIGTERM to SIGKILL (RLHF_TERMINATION_GRACE_SECONDS)


def _int(env: dict[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name, "")
    if raw == "" and default is not None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def read_process_env(env: dict[str, str]) -> ProcessEnv:
    """Parse the env contract; a missing or malformed variable raises ValueError naming it."""
    for name in (wire.ENV_ROLE, wire.ENV_CONFIG, wire.ENV_CHECKPOINT_DIR):
        if not env.get(name):
            raise ValueError(f"{name}: required environment variable is not set")
    bridge = env.get(wire.ENV_BRIDGE_ADDR, "")
    colocated = env.get(wire.ENV_COLOCATED_ROLES, "")
    return ProcessEnv(
        job=env.get(wire.ENV_JOB, ""),
        role=env[wire.ENV_ROLE],
        rank=_int(env, wire.ENV_ROLE_RANK, 0),
        replicas=_int(env, wire.ENV_ROLE_REPLICAS, 1),
        colocated_roles=tuple(r.strip() for r in colocated.split(",") if r.strip()),
        config_path=env[wire.ENV_CONFIG],
        role_addrs=wire.parse_role_addrs(env.get(wire.ENV_ROLE_ADDRS, "")),
        bridge_addr=wire.parse_addr(bridge, wire.ENV_BRIDGE_ADDR) if bridge else None,
        checkpoint_dir=env[wire.ENV_CHECKPOINT_DIR],
        restart_attempt=_int(env, wire.ENV_RESTART_ATTEMPT, 0),
        metrics_port=_int(env, wire.ENV_METRICS_PORT, 0),
        pod_ip=env.get(wire.ENV_POD_IP, ""),
        termination_grace=_int(env, wire.ENV_TERMINATION_GRACE, 30),
    )


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_role_world(*, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float = 1800) -> None:
    """Start this role's own torch.distributed world through DeepSpeed (idempotent).

    DeepSpeed reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* from the environment (else it goes
    looking for MPI), so they are set here from the RLHF env contract.
    """
    if dist.is_initialized():
        return
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": os.environ.get("LOCAL_RANK", "0"),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
        }
    )
    import deepspeed

    # On CPU DeepSpeed compiles a shared-memory all-reduce op on first init (~33 s); gloo suffices.
    # (importlib: `import deepspeed.comm.torch as m` would bind the real torch, re-exported by the package.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=default_backend(), timeout=timedelta(seconds=timeout_s), verbose=False)


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


def role_barrier() -> None:
    if world_size() > 1:
        dist.barrier()
