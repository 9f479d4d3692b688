"""Align (token, expert) pairs to experts on the device, for the grouped GEMMs of the fused MoE.

The pairs are numbered pair = token * K + k (the row-major order of the [T, K] routing tensors), so
the GEMMs can write each pair's row in place and a sum over K closes the MoE. The pairs are sorted
by expert and each expert's group is padded up to a multiple of BLOCK_M, so every block of BLOCK_M
sorted rows belongs to one expert:

    sorted_pairs [R]   pair ids in expert order; padding rows hold P (no pair), as do rows past
                       the padded total
    block_expert [B]   the expert of each block of BLOCK_M rows (E_l for blocks past the total)
    total        [1]   the padded row count, sum over e of ceil(count_e / BLOCK_M) * BLOCK_M

R = P + E_l (BLOCK_M - 1) and B = ceil(R / BLOCK_M) bound the padded total from the shapes alone,
so the kernels' grids are fixed by the shapes and programs whose block starts at or past `total`
exit at once. Pairs whose expert is E_l (held by another rank under expert parallelism) sort last
and get no row. Within an expert the pairs keep their order (a stable sort).

`align_pairs` is one Triton program (`_align_kernel`), which a decode step needs: the same
alignment in torch ops (tests/test_triton_moe.py keeps it as the kernel's reference) is a dozen
small launches (count, scans, a sort, scatters, a search), ~50 us of a 180 us decode layer of a
Mixtral-8x7B rank on an H200 (benchmarks/results/gpu-decode-profile). The program walks the
pairs in chunks of CHUNK: a one-hot [CHUNK, E] of their experts gives the counts (pass 1) and,
through a running cumulative sum, each pair's place in its expert's group (pass 3); pass 2 writes
the padding and the block experts, which depend only on the counts. A barrier orders pass 2's
writes before pass 3's. Nothing waits on the host, so the step stays capturable in a CUDA graph.

Legend: T tokens, K experts per token, P = T K pairs, E_l experts held by this rank, R sorted rows
(padded, upper bound), B blocks.
"""

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Pair-expert one-hot elements a chunk of the alignment program holds at once.
CHUNK_ELEMENTS = 8192


@dataclass(slots=True)
class ExpertAlignment:
    """Pairs sorted by expert and padded to whole blocks (see the module docstring)."""

    sorted_pairs: torch.Tensor  # [R] int32
    block_expert: torch.Tensor  # [B] int32
    total: torch.Tensor  # [1] int32
    block_m: int


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The padded row count's upper bound R = P + E_l (BLOCK_M - 1), from shapes alone."""
    return num_pairs + num_experts * (block_m - 1)


def align_pairs(experts: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Sort the pairs of expert ids [T, K] (values in [0, E_l], E_l meaning held elsewhere) by
    expert and pad each expert's group to a multiple of `block_m`, on the ids' device, in one
    Triton program (see the module docstring)."""
    flat = experts.flatten()
    num_pairs = flat.shape[0]
    rows = max_sorted_rows(num_pairs, num_experts, block_m)
    num_blocks = -(-rows // block_m)
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=experts.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=experts.device)
    total = torch.empty(1, dtype=torch.int32, device=experts.device)
    block_e = triton.next_power_of_2(num_experts)
    chunk = max(16, min(triton.next_power_of_2(max(rows, num_pairs)), CHUNK_ELEMENTS // block_e))
    _align_kernel[(1,)](
        flat,
        sorted_pairs,
        block_expert,
        total,
        num_pairs,
        num_experts,
        rows,
        num_blocks,
        BLOCK_M=block_m,
        BLOCK_E=block_e,
        CHUNK=chunk,
    )
    return ExpertAlignment(sorted_pairs=sorted_pairs, block_expert=block_expert, total=total, block_m=block_m)


if triton is not None:

    @triton.jit
    def _align_kernel(
        experts_ptr,  # [P]
        sorted_pairs_ptr,  # [R] int32
        block_expert_ptr,  # [B] int32
        total_ptr,  # [1] int32
        num_pairs,
        num_experts,
        num_rows,
        num_blocks,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        es = tl.arange(0, BLOCK_E)  # [E]
        # Columns past E_l match nothing: E_l itself is the id of pairs held elsewhere.
        columns = tl.where(es < num_experts, es, -1)
        lanes = tl.arange(0, CHUNK)  # [C]
        # Pass 1: pairs per held expert.
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            ids = tl.load(experts_ptr + start + lanes, mask=start + lanes < num_pairs, other=num_experts)
            counts += tl.sum((ids[:, None] == columns[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E], 0 past E_l
        padded_end = tl.cumsum(padded, axis=0)
        padded_start = padded_end - padded
        tl.store(total_ptr, tl.sum(padded, axis=0))
        # Pass 2: every row padding (P), every block its expert: held experts whose groups end at or
        # before the block's first row (E_l past the total).
        for start in range(0, num_rows, CHUNK):
            tl.store(
                sorted_pairs_ptr + start + lanes, tl.full((CHUNK,), num_pairs, tl.int32), mask=start + lanes < num_rows
            )
        for start in range(0, num_blocks, CHUNK):
            first_rows = (start + lanes) * BLOCK_M  # [C]
            held = (es < num_experts)[None, :]
            expert = tl.sum(((padded_end[None, :] <= first_rows[:, None]) & held).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + start + lanes, expert, mask=start + lanes < num_blocks)
        tl.debug_barrier()
        # Pass 3: each held pair's row: its expert's group start plus the pairs of that expert before it.
        before = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            pairs = start + lanes
            ids = tl.load(experts_ptr + pairs, mask=pairs < num_pairs, other=num_experts)
            onehot = (ids[:, None] == columns[None, :]).to(tl.int32)  # [C, E]
            place = tl.cumsum(onehot, axis=0) - onehot + before[None, :] + padded_start[None, :]  # [C, E]
            dest = tl.sum(place * onehot, axis=1)  # [C]
            tl.store(sorted_pairs_ptr + dest, pairs.to(tl.int32), mask=(pairs < num_pairs) & (ids < num_experts))
            before += tl.sum(onehot, axis=0)
