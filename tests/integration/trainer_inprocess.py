"""Run one algorithm's actor loop inside the test process (world of one, every role colocated).

    ctx = in_process_context(config_dict, tmp_path)
    run_actor(ctx)          # the algorithm's run(ctx): load data, train, checkpoint, export

Unlike trainer_harness.launch (separate `python -m rlhf_trainer` processes), a test can monkeypatch
what the loop calls (a loss function, a model loader) and inspect the Context afterwards.
DeepSpeed wants an initialised torch.distributed world: use the `role_world` fixture below.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from rlhf_contract.algorithms import ALGORITHMS
from rlhf_contract.config import parse_config
from rlhf_operator.localexec import free_port
from rlhf_trainer import distributed
from rlhf_trainer.distributed import ProcessEnv
from rlhf_trainer.metrics import TrainerMetrics, jsonl_path_for
from rlhf_trainer.runtime import Context, new_context
from rlhf_trainer.samples import samples_path_for


@pytest.fixture(scope="session")
def role_world():
    """A world of one process for the whole session (the unit tests' may already be up)."""
    if not torch.distributed.is_initialized():
        distributed.init_role_world(master_addr="127.0.0.1", master_port=free_port(), rank=0, world_size=1)
    return 0


def colocated_roles(roles: list[str] | tuple[str, ...]) -> dict:
    """A roles map with every role in the actor's process."""
    return {r: ({} if r == "actor" else {"colocate_with": "actor"}) for r in roles}


def in_process_context(config: dict, workdir: Path) -> Context:
    cfg = parse_config(config)
    checkpoint_dir = workdir / "checkpoints"
    env = ProcessEnv(job=cfg.job, role="actor", rank=0, world_size=1,
                     colocated_roles=tuple(r for r in cfg.roles if r != "actor"), config_path="",
                     role_addrs={}, bridge_addr=None, checkpoint_dir=str(checkpoint_dir), restart_attempt=0,
                     metrics_port=0, pod_ip="")
    metrics = TrainerMetrics(jsonl_path_for(checkpoint_dir, "actor", 0),
                             samples_path=samples_path_for(checkpoint_dir, "actor", 0))
    return new_context(env, cfg, None, metrics)


def run_actor(ctx: Context) -> None:
    torch.manual_seed(ctx.cfg.hyperparameters.seed)
    module = importlib.import_module(f"rlhf_trainer.algorithms.{ALGORITHMS[ctx.cfg.algorithm].module}")
    module.run(ctx)
