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
and get no row. Only device ops with shape-determined outputs run here (no `.item()`, `.tolist()`,
`bincount` or data-dependent Python branch): the step stays capturable in a CUDA graph and
compiles under `torch.compile(fullgraph=True)`.

Legend: T tokens, K experts per token, P = T K pairs, E_l experts held by this rank, R sorted rows
(padded, upper bound), B blocks.
"""

from dataclasses import dataclass

import torch


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
    expert and pad each expert's group to a multiple of `block_m`, on the ids' device."""
    device = experts.device
    flat = experts.flatten().long()  # [P]
    num_pairs = flat.shape[0]
    rows = max_sorted_rows(num_pairs, num_experts, block_m)
    num_blocks = -(-rows // block_m)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E_l + 1], the last one held elsewhere
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E_l]
    padded_end = torch.cumsum(padded, 0)  # [E_l]
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts  # [E_l + 1], where each expert's pairs begin once sorted
    order = torch.argsort(flat, stable=True)  # [P], pair ids by expert, token order kept within one
    sorted_experts = flat[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - start[sorted_experts]  # [P], place within its expert
    held = sorted_experts < num_experts
    # Pairs held elsewhere land on one spare row past R, cut off below.
    dest = torch.where(held, padded_start[sorted_experts.clamp(max=num_experts - 1)] + rank, rows)  # [P]
    sorted_pairs = torch.full((rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m  # [B]
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)  # [B], E_l past the total
    return ExpertAlignment(
        sorted_pairs=sorted_pairs[:rows],
        block_expert=block_expert.to(torch.int32),
        total=padded_end[-1:].to(torch.int32),
        block_m=block_m,
    )
