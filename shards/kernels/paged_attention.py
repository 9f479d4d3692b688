"""The C decode attention (paged_attention.c) behind a checked, torch-shaped call: q fp32, the KV
pools fp32 or bf16 (read in place, widened as read), fp32 math.

Legend: B decoding sequences, h query heads, kv KV heads, d head dim, N blocks, S block size,
M block-table width.
"""

import ctypes

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.checks import at_most, element_type, index, require, same
from mixserve.shards.kernels.native import KernelUnavailable

# The C kernel's fixed scratch sizes (paged_attention.c); the op takes the torch path past them.
MAX_HEADS, MAX_HEAD_DIM, MAX_BLOCK = 64, 256, 256
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, _P, ctypes.c_int, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _I64]
# The kernel's refusals, by status: it checks the values (every block id read, every context
# length) itself before reading, which costs far less than torch reductions over them here.
REFUSALS = {
    1: "heads, head dim or block size past the kernel's limits, or pools neither fp32 nor bf16",
    2: "a context length below 1 or past its block-table row (width x block size)",
    3: "a block id outside the pools",
}


def available() -> bool:
    """Whether the kernel runs under the current choice of kernels."""
    return _kernel() is not None


def _kernel():
    return native.function("paged_attention", "paged_decode_attention", _ARGTYPES)


def fits(heads: int, head_dim: int, block_size: int) -> bool:
    """Whether these shapes are within the kernel's fixed limits."""
    return heads <= MAX_HEADS and head_dim <= MAX_HEAD_DIM and block_size <= MAX_BLOCK


def check_cache(cache: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int, int, int]:
    """Both pools fp32 or both bf16, contiguous, [N, S, kv, d] alike; returns (N, S, kv, d)."""
    k_pool, v_pool = cache
    element_type(k_pool, "k_pool")
    shape = require(k_pool, "k_pool", k_pool.dtype, 4)
    if require(v_pool, "v_pool", k_pool.dtype, 4) != shape:
        raise ValueError(f"k_pool {shape} and v_pool {tuple(v_pool.shape)} must have one shape")
    at_most("block size", shape[1], MAX_BLOCK)
    at_most("head dim", shape[3], MAX_HEAD_DIM)
    return shape


def check_tables(tables: torch.Tensor, context_lens: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables [rows, M] and context lengths [rows] as the int64 tensors C reads (the kernel
    checks their values: ids inside the pools, lengths within the rows)."""
    tables = index(tables, "block_tables", 2)
    lens = index(context_lens, "context_lens", 1)
    same("rows of block_tables, context_lens and queries", tables=tables.shape[0], lens=lens.shape[0], queries=rows)
    return tables, lens


def check_queries(q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int, int, int, int, int]:
    """q [R, h, d] fp32 against the pools (check_cache), h a multiple of kv within MAX_HEADS; returns
    (R, h, d, N, S, kv)."""
    rows, heads, head_dim = require(q, "q", torch.float32, 3)
    blocks, block_size, kv_heads, pool_dim = check_cache(cache)
    same("head dims of q and the pools", q=head_dim, pools=pool_dim)
    at_most("query heads", heads, MAX_HEADS)
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of KV heads {kv_heads}")
    return rows, heads, head_dim, blocks, block_size, kv_heads


def refusal(status: int) -> str:
    """What a nonzero status of the kernel means."""
    return REFUSALS.get(status, f"status {status}")


def paged_decode_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention of one query per sequence, q [B, h, d] fp32, over its cached K/V (pools [N, S, kv, d], fp32 or bf16,
    tables [B, M], context lengths [B], each counting the query's own position); returns [B, h, d].
    Raises TypeError / ValueError for arguments the kernel cannot take."""
    fn = _kernel()
    if fn is None:
        raise KernelUnavailable("the paged attention kernel is not available")
    batch, heads, head_dim, blocks, block_size, kv_heads = check_queries(q, cache)
    tables, lens = check_tables(block_tables, context_lens, batch)
    k_pool, v_pool = cache
    out = torch.empty_like(q)
    status = fn(
        q.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        element_type(k_pool, "k_pool"),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        kv_heads,
        head_dim,
        block_size,
        tables.shape[1],
        blocks,
        scale,
        sliding_window or 0,
    )
    if status:
        raise ValueError(f"the paged attention kernel refused the step: {refusal(status)}")
    return out
