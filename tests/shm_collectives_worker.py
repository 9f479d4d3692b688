"""One rank of a real group for test_shm_collectives: runs the shared-memory collectives on tensors
every rank can rebuild (seeded by rank and call), and saves what each returned.

Run as `python tests/shm_collectives_worker.py OUT_FILE` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set: once through the C exchange (`OUT_FILE.native.rankR`), then through torch ops
(`OUT_FILE.torch.rankR`), each in a shared-memory group of its own.
"""

import os
import sys

import torch

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import close_process_group, init_process_group, tensor_parallel_group
from mixserve.shards.kernels import native

# Sizes past the C kernels' vector widths, odd ones for the tails, and repeated calls so both
# parities of the double-buffered slots are reused.
SHAPES = [(1,), (7,), (8, 256), (3, 1001), (8, 256), (1,), (64, 256)]


def part(rank: int, call: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What `rank` contributes to call number `call`: values of mixed magnitudes, so the order of the
    sum shows in the last bits."""
    g = torch.Generator().manual_seed(1000 * call + rank)
    return (torch.randn(shape, generator=g) * 10 ** torch.randint(-3, 4, shape, generator=g)).to(dtype)


def main() -> None:
    out_file = sys.argv[1]
    parallel = ParallelConfig(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    device = torch.device("cpu")
    init_process_group(parallel, device)
    for kernels in ("native", "torch"):
        native.select(kernels, ("shm_exchange",))
        torch.save(
            collect(tensor_parallel_group(parallel, device, "shm"), parallel),
            f"{out_file}.{kernels}.rank{parallel.rank}",
        )
    close_process_group()


def collect(group, parallel: ParallelConfig) -> dict:
    """What each collective returned on this rank."""
    rank = parallel.rank
    record = {"reduced": [], "gathered": [], "any": []}
    for call, shape in enumerate(SHAPES):
        record["reduced"].append(group.all_reduce(part(rank, call, shape)))
    # Not contiguous, and not float32: the torch path, in the same protocol.
    wide = part(rank, 50, (16, 6))
    record["strided"] = group.all_reduce(wide[:, ::2])
    record["float64"] = group.all_reduce(part(rank, 51, (5, 3), torch.float64))
    for call, shape in enumerate([(4, 3), (2, 5, 7)], start=60):
        record["gathered"].append(group.all_gather_last_dim(part(rank, call, shape, torch.float64)))
    for who in range(parallel.world_size):
        record["any"].append(group.any_rank(rank == who))
    record["any"].append(group.any_rank(False))
    return record


if __name__ == "__main__":
    main()
