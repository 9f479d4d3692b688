"""The C prefill attention (prefill_attention.c) behind a checked, torch-shaped call: one chunk of consecutive
positions of one sequence, q fp32, the KV pools fp32 or bf16 (read in place, widened as read), fp32 math.

Legend: R the chunk's positions, h query heads, kv KV heads, d head dim, N blocks, S block size, M
block-table width.
"""

import ctypes

import torch

from mixserve.shards.kernels import moe, native
from mixserve.shards.kernels.checks import element_type, index
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.kernels.paged_attention import check_queries, refusal

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, _P, ctypes.c_int, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _I64]


def available() -> bool:
    """Whether the kernel runs under the current choice of kernels."""
    return _kernel() is not None


def beats_torch() -> bool:
    """Whether the CPU backend's per-op prefill attention takes the kernel rather than torch's flash attention:
    where the build's widest vectors are AVX2's 8 floats, as the tiles' are (1.2-2.1x torch's speed on an AVX2
    EPYC core, benchmarks/results/prefill-attention-tiles). With AVX-512 torch's flash kernel has twice the
    lanes (not measured against), and a plain C build attends row by row. The decoder-layer kernel takes the
    tiles in every build: it attended a chunk's rows one query at a time before."""
    return available() and moe.vector_floats() == 8


def _kernel():
    return native.function("prefill_attention", "paged_prefill_attention", _ARGTYPES)


def paged_prefill_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_table: torch.Tensor,
    start: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention of one chunk, q [R, h, d] fp32 at positions start .. start + R - 1 of one sequence,
    over its cached K/V (pools [N, S, kv, d], fp32 or bf16, already holding the chunk's own) through its block
    table [M]; returns [R, h, d]. Raises TypeError / ValueError for arguments the kernel cannot take."""
    fn = _kernel()
    if fn is None:
        raise KernelUnavailable("the prefill attention kernel is not available")
    rows, heads, head_dim, blocks, block_size, kv_heads = check_queries(q, cache)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    table = index(block_table, "block_table", 1)
    k_pool, v_pool = cache
    out = torch.empty_like(q)
    if rows == 0:
        return out
    status = fn(
        q.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        element_type(k_pool, "k_pool"),
        table.data_ptr(),
        start + 1,
        out.data_ptr(),
        rows,
        heads,
        kv_heads,
        head_dim,
        block_size,
        table.shape[0],
        blocks,
        scale,
        sliding_window or 0,
    )
    if status:
        raise ValueError(f"the prefill attention kernel refused the chunk: {refusal(status)}")
    return out
