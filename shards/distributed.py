"""The tensor-parallel process group: rendezvous and the two collectives the model needs.

Rendezvous uses torch.distributed's env:// method (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE),
exactly as torchrun sets them. gloo on CPU, NCCL on CUDA.
"""

import datetime
import logging
import os
import socket
import uuid

import torch
import torch.distributed as dist

from mixserve.shards.config import ParallelConfig
from mixserve.shards.shm_collectives import SharedMemoryGroup

log = logging.getLogger(__name__)


class TensorParallelGroup:
    """All-reduce and all-gather over the shards of one model; no-ops at world size 1.

    With `shm` (CPU ranks of one host) tensors that fit a slot go through shared memory,
    the rest through torch.distributed.
    """

    def __init__(
        self, parallel: ParallelConfig, shm: SharedMemoryGroup | None = None, device: torch.device | None = None
    ) -> None:
        self.rank = parallel.rank
        self.world_size = parallel.world_size
        self.shm = shm
        # Small tensors of the group's own (flags, counts) live here: NCCL reduces only CUDA tensors.
        self.device = device or torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place; returns it."""
        if self.world_size > 1:
            if self.shm is not None and self.shm.fits(tensor):
                self.shm.all_reduce(tensor)
            else:
                dist.all_reduce(tensor)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along its last dimension, in rank order."""
        if self.world_size == 1:
            return tensor
        if self.shm is not None and self.shm.fits(tensor):
            return self.shm.all_gather_last_dim(tensor)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank; every rank must call it (one tiny all-reduce)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce(t).item() > 0)

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's `value` (used to agree on the KV cache size)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
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


def close_process_group() -> None:
    """Leave the group together: a barrier, then destroy it.

    A rank that simply exits while gloo's threads still hold connections to the others can die
    in a C++ destructor ("terminate called without an active exception", SIGABRT).
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shared_memory_group(parallel: ParallelConfig) -> SharedMemoryGroup | None:
    """A shared-memory group when every rank runs on this host (the launcher's case), else None.

    Needs the process group (to agree on the segment's name); collective on every rank.
    """
    if parallel.world_size == 1:
        return None
    hosts: list[str | None] = [None] * parallel.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) != 1:
        log.info("event=shm_collectives enabled=false reason=ranks_on_%d_hosts", len(set(hosts)))
        return None
    name = [f"mixserve-{uuid.uuid4().hex[:16]}"]
    if parallel.rank == 0:
        group = SharedMemoryGroup(name[0], 0, parallel.world_size, create=True)
    dist.broadcast_object_list(name, src=0)
    if parallel.rank != 0:
        group = SharedMemoryGroup(name[0], parallel.rank, parallel.world_size)
    dist.barrier()
    group.unlink()
    log.info("event=shm_collectives enabled=true segment=%s", name[0])
    return group


def tensor_parallel_group(
    parallel: ParallelConfig, device: torch.device, collectives: str = "auto"
) -> TensorParallelGroup:
    """The group the model uses. `collectives`: `auto` (shared memory for CPU ranks of one host,
    else torch.distributed), `shm` (shared memory, or fail), `torch` (torch.distributed only)."""
    if collectives not in ("auto", "shm", "torch"):
        raise ValueError(f"collectives must be auto, shm or torch, got {collectives!r}")
    shm = None
    if collectives != "torch" and device.type == "cpu":
        shm = shared_memory_group(parallel)
    if collectives == "shm" and shm is None and parallel.world_size > 1:
        raise ValueError("--collectives shm needs every rank on this host's CPU")
    return TensorParallelGroup(parallel, shm, device)
