"""The C decode attention (paged_attention.c) behind a torch-shaped call.

Legend: B decoding sequences, h query heads, kv KV heads, d head dim, N blocks, S block size,
M block-table width.
"""

import ctypes

import torch

from shards.kernels import native
from shards.kernels.native import KernelUnavailable

# The C kernel's fixed scratch sizes (paged_attention.c); larger shapes take the torch path.
MAX_HEADS, MAX_HEAD_DIM, MAX_BLOCK = 64, 256, 256
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _I64]


def _kernel():
    return native.function("paged_attention", "paged_decode_attention", _ARGTYPES)


def usable(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Whether decode attention of `q` over `k_pool` runs in the C kernel under the current choice."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k_pool.dtype != q.dtype:
        return False
    if q.shape[1] > MAX_HEADS or q.shape[2] > MAX_HEAD_DIM or k_pool.shape[1] > MAX_BLOCK:
        return False
    return _kernel() is not None


def paged_decode_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention of one query per sequence, q [B, h, d], over its cached K/V (pools [N, S, kv, d],
    tables [B, M], context lengths [B], each counting the query's own position); returns [B, h, d].

    Block ids and context lengths must lie inside the pools and tables (the runner checks them).
    """
    k_pool, v_pool = cache
    fn = _kernel()
    if fn is None:
        raise KernelUnavailable("the paged attention kernel is not available")
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("the KV pools must be contiguous")
    out = torch.empty_like(q)
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_pool.shape
    status = fn(
        q.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        kv_heads,
        head_dim,
        block_size,
        tables.shape[1],
        scale,
        sliding_window or 0,
    )
    if status:
        raise ValueError(f"paged attention kernel refused h={heads} kv={kv_heads} (status {status})")
    return out
