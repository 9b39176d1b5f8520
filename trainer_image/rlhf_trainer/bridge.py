"""The bridge: one process group joining every process of every role, separate from the roles' worlds.

Each role trains in its own torch.distributed world (distributed.init_role_world); batches travel
between roles over this group (gloo on CPU, NCCL on GPU), built on its own TCPStore hosted by actor
rank 0 at RLHF_BRIDGE_ADDR. Bridge ranks are assigned deterministically from the config's roles, so
every process computes the same layout without talking to anyone.

A message is a small JSON header (op name, metadata, the dtype and shape of each tensor) followed by
the tensors themselves, so shapes may change from call to call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Fixed role order: the actor's rank 0 must be bridge rank 0 (it hosts the TCPStore).
ROLE_ORDER = ("actor", "critic", "reward", "reference")

_DTYPES = {
    "int64": torch.int64,
    "int32": torch.int32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "bool": torch.bool,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class RolePlacement:
    """How many processes a role has and whose processes it runs in ('' = its own pods)."""

    replicas: int
    colocate_with: str = ""


def host_role(role: str, placements: dict[str, RolePlacement]) -> str:
    """The role whose processes run `role` (itself unless colocated)."""
    return placements[role].colocate_with or role


def bridge_ranks(placements: dict[str, RolePlacement]) -> dict[tuple[str, int], int]:
    """(role, role rank) -> bridge rank for every process that has pods of its own, actor first."""
    unknown = sorted(set(placements) - set(ROLE_ORDER))
    if unknown:
        raise ValueError(f"roles: unknown role(s) {unknown}; expected {list(ROLE_ORDER)}")
    if "actor" not in placements or placements["actor"].colocate_with:
        raise ValueError("roles.actor: every job needs an actor with pods of its own")
    ranks: dict[tuple[str, int], int] = {}
    for role in ROLE_ORDER:
        placement = placements.get(role)
        if placement is None or placement.colocate_with:
            continue
        for index in range(placement.replicas):
            ranks[(role, index)] = len(ranks)
    return ranks


def serving_rank(role: str, actor_rank: int, placements: dict[str, RolePlacement]) -> tuple[str, int]:
    """Which process (host role, host rank) answers `actor_rank`'s requests for `role`.

    Actor rank i is served by rank i mod replicas of the host role, so a role may have fewer
    replicas than the actor (each of its ranks then serves several actor ranks in turn).
    """
    host = host_role(role, placements)
    return host, actor_rank % placements[host].replicas


def served_actor_ranks(host: str, host_rank: int, placements: dict[str, RolePlacement]) -> list[int]:
    """The actor ranks a serving process answers, in the order it answers them."""
    actors = placements["actor"].replicas
    return [i for i in range(actors) if i % placements[host].replicas == host_rank]


def check_placements(placements: dict[str, RolePlacement]) -> None:
    """A serving role with more replicas than the actor would leave ranks idle and its world hung."""
    bridge_ranks(placements)
    for role, placement in placements.items():
        if placement.colocate_with and placement.colocate_with not in placements:
            raise ValueError(f"roles.{role}.colocate_with: no role named {placement.colocate_with!r}")
        if placement.colocate_with and placements[placement.colocate_with].colocate_with:
            raise ValueError(f"roles.{role}.colocate_with: {placement.colocate_with!r} is itself colocated")
        if role != "actor" and not placement.colocate_with and placement.replicas > placements["actor"].replicas:
            raise ValueError(
                f"roles.{role}.replicas: {placement.replicas} is more than the actor's {placements['actor'].replicas}"
            )


def parse_addr(addr: str, field: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{field}: expected HOST:PORT, got {addr!r}")
    return host, int(port)


def parse_role_addrs(value: str) -> dict[str, tuple[str, int]]:
    """`actor=HOST:PORT,critic=HOST:PORT` (RLHF_ROLE_ADDRS) -> {role: (host, port)}."""
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        role, sep, addr = item.partition("=")
        if not sep:
            raise ValueError(f"RLHF_ROLE_ADDRS: expected role=HOST:PORT, got {item!r}")
        out[role] = parse_addr(addr, f"RLHF_ROLE_ADDRS[{role}]")
    return out


class Bridge:
    """Point-to-point messages between processes of different roles."""

    def __init__(self, group: Any, rank: int, size: int, device: torch.device):
        self.group, self.rank, self.size, self.device = group, rank, size, device

    @classmethod
    def connect(cls, addr: tuple[str, int], rank: int, size: int, *, timeout: timedelta) -> Bridge:
        """Join the bridge as `rank` of `size`; a send / recv / barrier fails after `timeout` (NCCL's
        own default would be 10 minutes, shorter than a serving role's wait through an actor update)."""
        store = dist.TCPStore(addr[0], addr[1], size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore("bridge", store)
        if torch.cuda.is_available():
            group = dist.ProcessGroupNCCL(prefixed, rank, size, timeout)
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
            dev = torch.device("cpu")
        bridge = cls(group, rank, size, dev)
        bridge._store = store  # keep the store (and, on rank 0, its server) alive
        return bridge

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        self.group.send([tensor.to(self.device).contiguous()], dst, 0).wait()

    def _recv(self, shape: list[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self.group.recv([tensor], src, 0).wait()
        return tensor

    def send(self, dst: int, op: str, tensors: dict[str, torch.Tensor] | None = None, **meta: Any) -> None:
        tensors = tensors or {}
        header = {
            "op": op,
            "meta": meta,
            "tensors": [[name, _DTYPE_NAMES[t.dtype], list(t.shape)] for name, t in tensors.items()],
        }
        raw = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        self._send(torch.tensor([raw.numel()], dtype=torch.int64), dst)
        self._send(raw, dst)
        for tensor in tensors.values():
            self._send(tensor.detach(), dst)

    def recv(self, src: int) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        """-> (op, tensors on CPU by name, metadata)."""
        length = int(self._recv([1], torch.int64, src).item())
        header = json.loads(bytes(self._recv([length], torch.uint8, src).cpu().tolist()).decode())
        tensors = {
            name: self._recv(shape, _DTYPES[dtype], src).cpu() for name, dtype, shape in header["tensors"]
        }
        return header["op"], tensors, header["meta"]

    def barrier(self) -> None:
        self.group.barrier().wait()
