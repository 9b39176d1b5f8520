"""How a trainer process joins its groups (runtime.plan_groups): ranks, sizes, addresses, timeouts.

Every process group (the role's own world and the bridge) waits hyperparameters.
distributed_timeout_seconds before failing, default 30 minutes (OpenRLHF and verl use 30-60):
a serving role blocks on the bridge through the actor's whole update.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from rlhf_contract.config import parse_config
from rlhf_trainer.distributed import read_process_env
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.runtime import plan_groups


def config(roles, **hyperparameters):
    return parse_config({
        "job": "j", "algorithm": "ppo", "model": {"path": "tiny://llama"}, "dataset": {"path": "synthetic://arithmetic"},
        "reward": {"type": "rule", "rule": "exact_match"}, "roles": roles, "hyperparameters": hyperparameters,
    })


def env(role, rank, replicas, **extra):
    return read_process_env({
        "RLHF_ROLE": role, "RLHF_ROLE_RANK": str(rank), "RLHF_ROLE_REPLICAS": str(replicas),
        "RLHF_CONFIG": "/etc/rlhf/config.json", "RLHF_CHECKPOINT_DIR": "/ckpt",
        "RLHF_ROLE_ADDRS": "actor=a:1,critic=c:2,reference=r:3", "RLHF_BRIDGE_ADDR": "a:4", **extra,
    })


SEPARATE = {"actor": {"replicas": 2}, "critic": {"replicas": 2}, "reference": {"replicas": 1}}


def test_both_groups_wait_the_configured_timeout():
    world, bridge = plan_groups(env("critic", 1, 2), config(SEPARATE, distributed_timeout_seconds=3600))
    assert world.timeout == bridge.timeout == timedelta(hours=1)


def test_the_default_timeout_is_thirty_minutes():
    world, bridge = plan_groups(env("actor", 0, 2), config(SEPARATE))
    assert world.timeout == bridge.timeout == timedelta(minutes=30)


def test_a_timeout_under_a_minute_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="hyperparameters.distributed_timeout_seconds"):
        config(SEPARATE, distributed_timeout_seconds=5)


def test_ranks_sizes_and_addresses_of_each_group():
    world, bridge = plan_groups(env("critic", 1, 2), config(SEPARATE))
    assert (world.addr, world.rank, world.size) == (("c", 2), 1, 2)
    # Bridge ranks: actor 0, 1, critic 0, 1, reference 0.
    assert (bridge.addr, bridge.rank, bridge.size) == (("a", 4), 3, 5)


def test_one_process_for_every_role_has_no_bridge():
    roles = {"actor": {}, "critic": {"colocate_with": "actor"}, "reference": {"colocate_with": "actor"}}
    world, bridge = plan_groups(env("actor", 0, 1, RLHF_COLOCATED_ROLES="critic,reference"), config(roles))
    assert bridge is None and world.size == 1


def test_missing_addresses_are_config_errors_naming_the_variable():
    with pytest.raises(ConfigError, match="RLHF_ROLE_ADDRS"):
        plan_groups(env("actor", 0, 2, RLHF_ROLE_ADDRS="critic=c:2"), config(SEPARATE))
    with pytest.raises(ConfigError, match="RLHF_BRIDGE_ADDR"):
        plan_groups(env("actor", 0, 2, RLHF_BRIDGE_ADDR=""), config(SEPARATE))
