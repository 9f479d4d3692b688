"""The Triton kernels as shards.ops ops: each function has its op's name and the reference's
signature (shards.ops.reference), runs the kernel where it takes the arguments and the torch
reference where it does not, so `--kernels triton` never fails on an odd shape or dtype.

What a kernel does not take (the reference runs, logged once per op as event=kernel_fallback):
- rms_norm: x not [T, H] of fp32/fp16/bf16 (H <= norm.MAX_HIDDEN), weight or residual of another
  dtype, a last dimension not contiguous;
- rotary_write_kv: a head dim not twice a power of two, tables not fp32, q/k/v heads not
  contiguous within a token, pools not contiguous, in another dtype;
- paged_decode_attention / paged_prefill_attention: a head dim not a power of two in [16, 128],
  heads not a multiple of the KV heads, index tensors not contiguous int32/int64;
- topk_softmax: logits not [T, E] of fp32/fp16/bf16 with a contiguous last dimension, E past
  routing.MAX_EXPERTS or below K;
- fused_moe: weights not in the activations' dtype (fp32/fp16/bf16), routing weights not fp32,
  tensors not contiguous.
A model in fp32/fp16/bf16 with Mixtral's or the demo's shapes meets none of these. On CPU tensors
the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 before triton was imported; the
shards.ops selection sets it): the path the tests take through the whole server.

Legend: T tokens, H hidden size, h query heads, kv KV heads, d head dim, N blocks, S block size,
B decoding sequences, M block-table width, P prefill chunks, E_l experts held, I_l intermediate
size held, K experts per token.
"""

import logging

import torch

from mixserve.shards.ops import reference
from mixserve.shards.triton import attention, moe, norm, rotary, routing

log = logging.getLogger(__name__)

INDEX_DTYPES = (torch.int32, torch.int64)
_fallbacks_logged: set[str] = set()


def _fallback(op: str, reason: str) -> None:
    if op not in _fallbacks_logged:
        _fallbacks_logged.add(op)
        log.warning("event=kernel_fallback op=%s backend=torch reason=%r", op, reason)


def _index(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype in INDEX_DTYPES and t.is_contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * norm(x) of x [T, H]; with `residual` [T, H], (the norm of x + residual, x + residual),
    both from one kernel."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if (
        norm.usable(x)
        and (residual is None or residual.shape == x.shape)
        and all(t.dtype == x.dtype and t.device == x.device and t.stride(-1) == 1 for t in tensors)
    ):
        return norm.rms_norm(x, weight, eps, residual)
    _fallback("rms_norm", f"x {x.dtype} {tuple(x.shape)} on {x.device}")
    return reference.rms_norm(x, weight, eps, residual)


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q [T, h, d] and k [T, kv, d] and store k, v at `slot_mapping` [T] of the pools, in one
    kernel; returns q, rotated in place (k too: the caller's k is rotated afterwards)."""
    k_pool, v_pool = cache
    head_dim = q.shape[-1]
    heads_contiguous = all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == head_dim for t in (q, k, v))
    if (
        rotary.usable(q)
        and heads_contiguous
        and all(t.dtype == q.dtype for t in (k, v, k_pool, v_pool))
        and cos.dtype == sin.dtype == torch.float32
        and _index(positions)
        and _index(slot_mapping)
        and all(t.is_contiguous() for t in (cos, sin, k_pool, v_pool))
    ):
        rotary.rotary_write_kv(positions, q, k, v, cos, sin, k_pool, v_pool, slot_mapping)
        return q
    _fallback("rotary_write_kv", f"q {q.dtype} {tuple(q.shape)} strides {q.stride()}")
    return reference.rotary_write_kv(positions, q, k, v, cos, sin, cache, slot_mapping)


def _attention_takes(q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], block_tables: torch.Tensor) -> bool:
    k_pool, v_pool = cache
    return (
        q.dim() == 3
        and attention.usable(q, k_pool, interpreter=True)
        and v_pool.shape == k_pool.shape
        and v_pool.dtype == q.dtype
        and q.stride(2) == 1
        and k_pool.stride(3) == 1
        and v_pool.stride(3) == 1
        and block_tables.dim() == 2
        and block_tables.dtype in INDEX_DTYPES
        and block_tables.stride(1) == 1
    )


def paged_decode_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence, q [B, h, d], over its blocks (tables [B, M], context
    lengths [B]) read in place; returns [B, h, d]. The grid depends on shapes alone (capturable)."""
    if _attention_takes(q, cache, block_tables) and _index(context_lens):
        return attention.paged_decode_attention(q, cache, block_tables, context_lens, scale, sliding_window)
    _fallback("paged_decode_attention", f"q {q.dtype} {tuple(q.shape)}, pools {tuple(cache[0].shape)}")
    return reference.paged_decode_attention(q, cache, block_tables, context_lens, scale, sliding_window)


def paged_prefill_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    query_start: torch.Tensor,
    start_positions: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    chunks: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Causal attention of prefill chunks q [T, h, d] over the paged cache; returns [T, h, d]. The
    host `chunks` (tokens, start) size the grid by the longest chunk (without them, by T)."""
    if _attention_takes(q, cache, block_tables) and _index(query_start) and _index(start_positions):
        longest = max((tokens for tokens, _ in chunks), default=0) if chunks is not None else None
        return attention.paged_prefill_attention(
            q, cache, query_start, start_positions, block_tables, scale, sliding_window, longest
        )
    _fallback("paged_prefill_attention", f"q {q.dtype} {tuple(q.shape)}, pools {tuple(cache[0].shape)}")
    return reference.paged_prefill_attention(
        q, cache, query_start, start_positions, block_tables, scale, sliding_window, chunks
    )


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, K] (fp32) and expert ids [T, K] of router logits [T, E], one kernel."""
    if routing.usable(logits, top_k):
        return routing.topk_softmax(logits, top_k)
    _fallback("topk_softmax", f"logits {logits.dtype} {tuple(logits.shape)} on {logits.device}, top_k {top_k}")
    return reference.topk_softmax(logits, top_k)


def fused_moe(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """This rank's partial MoE output [T, H] for hidden [T, H], w13 [E_l, 2 I_l, H], w2 [E_l, H, I_l],
    routing weights [T, K] and expert ids [T, K] (E_l: held elsewhere), with no host sync."""
    if (
        moe.usable(hidden, w13)
        and w2.dtype == hidden.dtype
        and weights.dtype == torch.float32
        and experts.dtype in INDEX_DTYPES
        and all(t.is_contiguous() for t in (hidden, w13, w2, weights, experts))
    ):
        return moe.fused_moe(hidden, w13, w2, weights, experts)
    _fallback("fused_moe", f"hidden {hidden.dtype} {tuple(hidden.shape)}, w13 {w13.dtype}")
    return reference.fused_moe(hidden, w13, w2, weights, experts)
