"""The tensor-parallel process group: rendezvous and the two collectives the model needs.

Rendezvous uses torch.distributed's env:// method (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE),
exactly as torchrun sets them. gloo on CPU, NCCL on CUDA.
"""

import datetime
import logging
import os

import torch
import torch.distributed as dist

from shards.config import ParallelConfig

log = logging.getLogger(__name__)


class TensorParallelGroup:
    """All-reduce and all-gather over the shards of one model; no-ops at world size 1."""

    def __init__(self, parallel: ParallelConfig) -> None:
        self.rank = parallel.rank
        self.world_size = parallel.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along its last dimension, in rank order."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's `value` (used to agree on the KV cache size)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def init_process_group(parallel: ParallelConfig, device: torch.device, timeout_s: float = 600) -> None:
    """Join the group through MASTER_ADDR/MASTER_PORT (defaults 127.0.0.1:29500)."""
    if parallel.world_size == 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    log.info(
        "event=rendezvous rank=%d world_size=%d backend=%s master=%s:%s",
        parallel.rank,
        parallel.world_size,
        backend,
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    )
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=parallel.rank,
        world_size=parallel.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
