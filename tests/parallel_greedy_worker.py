"""One rank of a real group for test_parallel_greedy: every rank builds the same full logits, keeps
its vocabulary slice the way ParallelLMHead does (padded to ceil(V / n) columns, the padding filled
with a huge value that must be ignored), and saves what the runner's greedy choice gives for it
(`greedy_choice` of the slice's `slice_stats`), as tensors.

Run as `python tests/parallel_greedy_worker.py OUT_FILE RUNS_JSON` with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set. RUNS_JSON lists the runs, one after another in the same process group: each a name,
the vocabulary size, the collectives (auto or torch) and the kernels (auto or torch); each run's record
goes to `OUT_FILE.NAME.rankR`.
"""

import json
import os
import sys

import torch

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import (
    TensorParallelGroup,
    close_process_group,
    init_process_group,
    tensor_parallel_group,
)
from mixserve.shards.parallel_greedy import greedy_choice, slice_stats


def full_logits(vocab: int) -> torch.Tensor:
    """[R, V]: random rows, a tie across the first slice boundary, and a maximum in the last column."""
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(3)) * 4
    per_rank = -(-vocab // int(os.environ["WORLD_SIZE"]))
    logits[1, per_rank - 1] = logits[1, per_rank] = 50.0  # the lower id must win
    logits[2, vocab - 1] = 60.0
    return logits


def grammar_bitmask(vocab: int) -> tuple[list[int], torch.Tensor]:
    """Constrained rows [0, 2, 4] and their masks [3, W]: row 0 allows only the last rank's tokens, so
    the other ranks' slices hold nothing allowed; rows 2 and 4 allow a random half."""
    words = -(-vocab // 32)
    gen = torch.Generator().manual_seed(5)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[0] = 0
    bitmask[0, -1] = torch.tensor(1 << ((vocab - 1) % 32)).to(torch.int32)  # bit 31 wraps to the sign bit
    return [0, 2, 4], bitmask


def choose(local: torch.Tensor, start: int, vocab: int, group: TensorParallelGroup):
    """(token ids, log-probabilities) as tensors, or None, as the runner chooses from this rank's slice."""
    chosen = greedy_choice(slice_stats(local, start, vocab), group)
    return None if chosen is None else (torch.tensor(chosen[0]), torch.tensor(chosen[1]))


def main() -> None:
    out_file, runs = sys.argv[1], json.loads(sys.argv[2])
    parallel = ParallelConfig(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    device = torch.device("cpu")
    init_process_group(parallel, device)
    for name, vocab, collectives, kernels in runs:
        group = tensor_parallel_group(parallel, device, collectives)
        ops.select(kernels, device, torch.float32)
        torch.save(run(vocab, parallel, group), f"{out_file}.{name}.rank{parallel.rank}")
    close_process_group()


def run(vocab: int, parallel: ParallelConfig, group: TensorParallelGroup) -> dict:
    """This rank's record of one run (the module's docstring)."""
    logits = full_logits(vocab)
    per_rank = -(-vocab // parallel.world_size)
    start = parallel.rank * per_rank
    local = torch.full((logits.shape[0], per_rank), 1e30)
    valid = logits[:, start : start + per_rank]
    local[:, : valid.shape[1]] = valid
    record = {"logits": logits, "chosen": choose(local, start, vocab, group)}
    rows, bitmask = grammar_bitmask(vocab)
    masked = ops.current().apply_token_bitmask(local, rows, bitmask, start, vocab)
    record["masked"] = choose(masked, start, vocab, group)
    record["masked_full"] = ops.current().apply_token_bitmask(logits, rows, bitmask, 0, vocab)
    bad = local.clone()
    if parallel.rank == parallel.world_size - 1:
        bad[3, 0] = float("nan")
    record["with_nan"] = choose(bad, start, vocab, group)
    return record


if __name__ == "__main__":
    main()
