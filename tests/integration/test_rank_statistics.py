"""Statistics that steer training are equal on every rank and equal to one process holding all rows.

Two gloo processes hold different rows (different counts too); each computes the helpers with
distributed.all_reduce_tensor, and both answers must match the single-process answer on the
concatenated rows. The PPO case runs the real loop with two actor ranks and the adaptive KL
controller: both ranks must carry the same coefficient, moved by the whole batch's KL and size.
"""

from __future__ import annotations

import math
import multiprocessing

import pytest
import torch
from rlhf_operator.localexec import free_port
from rlhf_trainer.losses import utils
from trainer_harness import launch, trainer_config


def _rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 holds 3 rows, rank 1 holds 2; masks of different lengths; different scales per rank."""
    g = torch.Generator().manual_seed(rank)
    values = torch.randn(3 - rank, 5, generator=g, dtype=torch.float64) * (1 + 4 * rank) + 3 * rank
    mask = (torch.arange(5) < torch.tensor([5, 2, 4][: 3 - rank])[:, None]).to(torch.float64)
    return values, mask


def _worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist
    from rlhf_trainer import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values, mask = _rows(rank)
        reduce = distributed.all_reduce_tensor
        mean, var = utils.global_masked_moments(values, mask, reduce=reduce)
        out.put((rank, {
            "mean": mean.item(), "var": var.item(),
            # Plain lists: a tensor in a Queue is shared through a file descriptor that dies with its process.
            "whitened": utils.masked_whiten(values, mask, reduce=reduce).tolist(),
            "row_mean": utils.global_mean(values.sum(-1), reduce=reduce),
        }))
    finally:
        dist.destroy_process_group()


def test_global_moments_whitening_and_means_match_one_process_on_two_ranks():
    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    values = torch.cat([_rows(0)[0], _rows(1)[0]])
    mask = torch.cat([_rows(0)[1], _rows(1)[1]])
    picked = values[mask.bool()]
    whitened = utils.masked_whiten(values, mask)
    for rank in (0, 1):
        assert got[rank]["mean"] == pytest.approx(picked.mean().item())
        assert got[rank]["var"] == pytest.approx(picked.var().item())
        assert got[rank]["row_mean"] == pytest.approx(values.sum(-1).mean().item())
    assert torch.allclose(torch.tensor(got[0]["whitened"] + got[1]["whitened"], dtype=torch.float64), whitened)
    # The local answer differs: what each rank computed before the statistics were global.
    assert utils.global_masked_moments(*_rows(1))[0].item() != pytest.approx(picked.mean().item())


@pytest.mark.slow
def test_ppo_ranks_share_the_adaptive_kl_coefficient(tmp_path):
    target, horizon, batch = 0.01, 50, 4
    config = trainer_config(
        "ppo",
        roles={"actor": {"replicas": 2}, "critic": {}, "reference": {"colocate_with": "critic"}},
        hyperparameters={"max_steps": 3, "batch_size": batch, "micro_batch_size": 2, "kl_coef": 0.1,
                         "kl_target": target, "kl_horizon": horizon, "kl_estimator": "k3"},
        checkpoint={"interval_steps": 100, "keep": 1},
    )
    run = launch(config, tmp_path)
    assert run.ok, run.describe()
    rank0, rank1 = run.metrics("actor", 0), run.metrics("actor", 1)
    assert [r["kl_coef"] for r in rank0] == [r["kl_coef"] for r in rank1]
    # Ziegler et al. 2019, eq. 2 with the GLOBAL batch's mean KL and size (n_steps = batch_size).
    coef = 0.1
    for row in rank0:
        coef *= 1 + min(max(row["kl"] / target - 1, -0.2), 0.2) * batch / horizon
        assert math.isclose(row["kl_coef"], coef, rel_tol=1e-9), (row, coef)
