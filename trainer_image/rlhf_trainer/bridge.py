"""The bridge: one process group joining every process of every role, separate from the roles' worlds.

Each role trains in its own torch.distributed world (distributed.init_role_world); batches travel
between roles over this group (gloo on CPU, NCCL on GPU), built on its own TCPStore hosted by actor
rank 0 at RLHF_BRIDGE_ADDR. Bridge ranks are assigned deterministically from the config's roles
(rlhf_contract.layout.bridge_ranks), so every process computes the same layout without talking to anyone.

A message is a small JSON header (op name, metadata, the dtype and shape of each tensor) followed by
the tensors themselves, so shapes may change from call to call.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

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
