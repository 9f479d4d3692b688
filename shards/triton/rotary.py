"""Rotary embedding of q and k in place with the KV-cache write fused, in Triton.

    rotary_write_kv(positions, q, k, v, cos, sin, k_pool, v_pool, slot_mapping) -> None
        positions [T] int; q [T, h, d], k and v [T, kv, d] (fp32, fp16 or bf16; tokens any stride
        apart, each token's heads contiguous, as views of one qkv projection are); cos and sin
        [P, d] fp32 tables (`shards.layers.rotary.RotaryEmbedding`); k_pool and v_pool
        [N, S, kv, d] contiguous, in q's dtype; slot_mapping [T] int, slot = block S + offset.
        Rotates q and k in place (rotate-half / NeoX layout, as RotaryEmbedding.forward) and
        stores the rotated k and v at each token's slot (as `write_kv`); a negative slot skips the
        store (padding rows of a captured batch). Positions must lie in [0, P) and slots in
        [0, N S): they are device values, so they are not checked (that would sync the host).
    usable(q) -> bool
        whether `rotary_write_kv` can run q (Triton present, a supported dtype, a CUDA device or
        the interpreter).

One program per token covers all its heads: tiles [BLOCK_HEADS, d/2] over the two halves of each
head, with BLOCK_HEADS the next power of two of max(h, kv) and d/2 a power of two
(`usable`/the checks refuse others). The rotation runs in fp32 and rounds once to the dtype.

Legend: T tokens, h query heads, kv KV heads, d head dim, P positions in the tables, N blocks,
S block size.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

if triton is not None:

    @triton.jit
    def _rotate(x_ptr, stride_t, token, heads, num_heads, dims, cos1, sin1, cos2, sin2, HALF: tl.constexpr):
        """Rotate one token's heads in place; returns the rotated halves (fp32)."""
        ptrs = x_ptr + token * stride_t + heads[:, None] * (2 * HALF) + dims[None, :]  # [BH, d/2]
        ok = heads[:, None] < num_heads
        x1 = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
        r1 = x1 * cos1 - x2 * sin1
        r2 = x2 * cos2 + x1 * sin2
        tl.store(ptrs, r1.to(x_ptr.dtype.element_ty), mask=ok)
        tl.store(ptrs + HALF, r2.to(x_ptr.dtype.element_ty), mask=ok)
        return r1, r2

    @triton.jit
    def _rotary_write_kv_kernel(
        positions_ptr,  # [T]
        q_ptr,  # [T, h, d]
        k_ptr,  # [T, kv, d]
        v_ptr,  # [T, kv, d]
        cos_ptr,  # [P, d]
        sin_ptr,  # [P, d]
        k_pool_ptr,  # [N S, kv, d]
        v_pool_ptr,  # [N S, kv, d]
        slots_ptr,  # [T]
        num_q_heads,
        num_kv_heads,
        stride_qt,
        stride_kt,
        stride_vt,
        HALF: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        pos = tl.load(positions_ptr + token).to(tl.int64)
        dims = tl.arange(0, HALF)
        table = pos * (2 * HALF) + dims
        cos1 = tl.load(cos_ptr + table)[None, :]  # [1, d/2]
        sin1 = tl.load(sin_ptr + table)[None, :]
        cos2 = tl.load(cos_ptr + table + HALF)[None, :]
        sin2 = tl.load(sin_ptr + table + HALF)[None, :]
        heads = tl.arange(0, BLOCK_HEADS)
        _rotate(q_ptr, stride_qt, token, heads, num_q_heads, dims, cos1, sin1, cos2, sin2, HALF)
        k1, k2 = _rotate(k_ptr, stride_kt, token, heads, num_kv_heads, dims, cos1, sin1, cos2, sin2, HALF)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot < 0:
            return
        ok = heads[:, None] < num_kv_heads
        within = heads[:, None] * (2 * HALF) + dims[None, :]  # [BH, d/2]
        k_dst = k_pool_ptr + slot * num_kv_heads * (2 * HALF) + within
        tl.store(k_dst, k1.to(k_pool_ptr.dtype.element_ty), mask=ok)
        tl.store(k_dst + HALF, k2.to(k_pool_ptr.dtype.element_ty), mask=ok)
        v_src = v_ptr + token * stride_vt + within
        v_dst = v_pool_ptr + slot * num_kv_heads * (2 * HALF) + within
        tl.store(v_dst, tl.load(v_src, mask=ok, other=0.0), mask=ok)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=ok, other=0.0), mask=ok)


def _interpreted() -> bool:
    return type(_rotary_write_kv_kernel).__name__ == "InterpretedFunction"


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def usable(q: torch.Tensor) -> bool:
    """Whether `rotary_write_kv` runs q [T, h, d]: Triton importable, fp32/fp16/bf16, d/2 a power
    of two, on a CUDA device (or any device when the kernel runs in the interpreter)."""
    if triton is None or q.dtype not in SUPPORTED_DTYPES or q.dim() != 3 or q.shape[2] % 2:
        return False
    if not _power_of_two(q.shape[2] // 2):
        return False
    return q.device.type == "cuda" or _interpreted()


def _check(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if triton is None:
        raise ValueError("rotary_write_kv needs triton, which is not installed")
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in (k, v, k_pool, v_pool)):
        raise ValueError(
            f"rotary_write_kv: q, k, v and the pools must share one of {SUPPORTED_DTYPES}, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}, {k_pool.dtype}, {v_pool.dtype}"
        )
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"rotary_write_kv: cos and sin must be float32, got {cos.dtype}, {sin.dtype}")
    if positions.dtype not in INDEX_DTYPES or slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"rotary_write_kv: positions and slot_mapping must be int32 or int64, got "
            f"{positions.dtype}, {slot_mapping.dtype}"
        )
    if q.dim() != 3 or k.dim() != 3 or k_pool.dim() != 4:
        raise ValueError(
            f"rotary_write_kv: expected q [T, h, d], k and v [T, kv, d], pools [N, S, kv, d]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(k_pool.shape)}"
        )
    tokens, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"rotary_write_kv: k {tuple(k.shape)}, v {tuple(v.shape)} must be [{tokens}, kv, {head_dim}]")
    if k_pool.shape != v_pool.shape or k_pool.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"rotary_write_kv: pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)} "
            f"must be [N, S, {k.shape[1]}, {head_dim}]"
        )
    if positions.shape != (tokens,) or slot_mapping.shape != (tokens,):
        raise ValueError(
            f"rotary_write_kv: positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
            f"must be [{tokens}]"
        )
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != head_dim:
        raise ValueError(f"rotary_write_kv: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [P, {head_dim}]")
    if head_dim % 2 or not _power_of_two(head_dim // 2):
        raise ValueError(f"rotary_write_kv: head dim {head_dim} must be twice a power of two")
    tensors = (positions, q, k, v, cos, sin, k_pool, v_pool, slot_mapping)
    if len({t.device for t in tensors}) != 1:
        raise ValueError("rotary_write_kv: all tensors must be on one device")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"rotary_write_kv: each token's heads of {name} must be contiguous")
    if not all(t.is_contiguous() for t in (positions, cos, sin, k_pool, v_pool, slot_mapping)):
        raise ValueError("rotary_write_kv: positions, cos, sin, the pools and slot_mapping must be contiguous")


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate q [T, h, d] and k [T, kv, d] in place by positions [T] and store k, v at their slots
    [T] of the pools [N, S, kv, d] (negative slots skipped); see the module docstring."""
    _check(positions, q, k, v, cos, sin, k_pool, v_pool, slot_mapping)
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if tokens:
        _rotary_write_kv_kernel[(tokens,)](
            positions,
            q,
            k,
            v,
            cos,
            sin,
            k_pool,
            v_pool,
            slot_mapping,
            num_q_heads,
            num_kv_heads,
            q.stride(0),
            k.stride(0),
            v.stride(0),
            HALF=head_dim // 2,
            BLOCK_HEADS=triton.next_power_of_2(max(num_q_heads, num_kv_heads)),
        )
