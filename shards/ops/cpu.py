"""The CPU backend: the C kernels (shards/kernels) for CPU tensors. Each op checks the shape
limits of its kernel here, in one place, and takes the torch reference for what it cannot take
(another dtype or device, more heads or tokens than the kernel holds); the kernels' wrappers then
check every argument before C sees a pointer. The decoder-layer ops (causal_lm, decoder_layers) are in
shards/ops/cpu_layers.py, the choice of path by rows in shards/ops/cpu_rows.py, the ops on logits in
shards/ops/cpu_logits.py.

bf16: a model held in bf16 runs in torch as transformers runs it (bf16 activations, fp32 softmax),
and the kernels that read weights or the KV cache (linear_rows, fused_moe, paged_decode_attention,
paged_prefill_attention, decoder_layers) read them in bf16 in place, with fp32 activations and fp32
accumulation (a matmul's input rows rounded to bf16 for the CPU's bf16 dot product where it has one:
rows_times_weight.h): each such op widens its bf16 activations on entry and rounds its result to bf16
on return, and the decoder layer kernel keeps a step's residual stream in fp32 across all its
layers. The norms run in C in bf16 too, rounding where transformers rounds; rotary stays fp32-only
(in bf16 the torch reference runs it); the greedy statistics read the logits, fp32 in every dtype.

int8-wo: the same kernels read weight-only int8 weights (Int8Weight: codes and row scales) in place
where they read fp32 or bf16 ones. Past the MoE kernel's cap (prefill chunks, large batches), and for a
linear from cpu_rows.INT8_GEMM_LINEAR_ROWS rows, an int8 step in bf16 on a CPU with avx512_bf16 dequantizes the
weights it uses into scratch for torch's bf16 GEMM (shards.ops.int8_gemm); in fp32, or without
avx512_bf16, the kernels run uncapped over row tiles, which beats a dequantized fp32 GEMM; kernels
without vector loops (plain C) leave it to the GEMM path (benchmarks/results/int8-prefill,
int8-gemm-crossover-0.8b).

Legend: T tokens, H hidden size, h query heads, d head dim, B decoding sequences, R rows.
"""

import torch

from mixserve.shards.kernels import (
    decoder_layer,
    elementwise,
    linear,
    moe,
    paged_attention,
    prefill_attention,
    sampling,
)
from mixserve.shards.ops import cpu_rows, int8_gemm, reference
from mixserve.shards.ops.cpu_layers import causal_lm as causal_lm
from mixserve.shards.ops.cpu_layers import decoder_layers as decoder_layers
from mixserve.shards.ops.cpu_logits import apply_token_bitmask as apply_token_bitmask
from mixserve.shards.ops.cpu_logits import combine_greedy as combine_greedy
from mixserve.shards.ops.cpu_logits import draw_tokens as draw_tokens
from mixserve.shards.ops.cpu_logits import row_argmax_logsumexp as row_argmax_logsumexp
from mixserve.shards.ops.cpu_logits import slice_greedy_stats as slice_greedy_stats
from mixserve.shards.quant.int8_weight import Int8Weight

_F32 = torch.float32
# The ops whose kernels a bf16 model leaves to torch (shards.ops.select): rotary, whose outputs transformers
# rounds to bf16 where the kernels keep fp32. Every other kernel reads bf16 weights or KV pools (the norm
# rounds as transformers does: a bf16 decode step's final norm took ~40 us in torch's seven ops on the demo,
# ~17 in C), or the logits, which sampling widens to fp32 in every dtype (the greedy statistics in torch took
# ~75 us of a one-row bf16 step and ~300 us of a six-row verification on the demo's 32000 tokens, in C
# ~25 and ~110).
FP32_ONLY_OPS = ("rotary", "rotary_write_kv")
# Tokens per call of the MoE kernel for int8 steps past its cap: bounds its scratch (P (2I + 2H) floats)
# and keeps a tile's rows in cache; 1024 tokens as 4 tiles ran ~15 % faster than as one call.
INT8_MOE_TILE = 256


def _fp32_cpu(x: torch.Tensor) -> bool:
    return x.dtype is _F32 and x.is_cpu


def _weight_dtype_cpu(x: torch.Tensor) -> bool:
    return x.dtype in cpu_rows.WEIGHT_DTYPES and x.is_cpu


def _kernel_weight(weight: torch.Tensor | Int8Weight) -> bool:
    """Whether the kernels read this weight in place: fp32 or bf16, or int8 codes, contiguous on the CPU."""
    data = weight.codes if isinstance(weight, Int8Weight) else weight
    return (
        (isinstance(weight, Int8Weight) or data.dtype in cpu_rows.WEIGHT_DTYPES)
        and data.is_cpu
        and data.is_contiguous()
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """reference.rms_norm, the norm in the C kernel for [T, H] in fp32, or in bf16 with its roundings."""
    if x.dim() != 2 or not x.is_cpu or x.dtype not in cpu_rows.WEIGHT_DTYPES or weight.dtype is not x.dtype:
        return reference.rms_norm(x, weight, eps, residual)
    if residual is not None:
        summed = x + residual
        return elementwise.rms_norm(summed, weight, eps), summed
    return elementwise.rms_norm(x.contiguous(), weight, eps)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.rotary, in the C kernel for fp32 q and k whose heads lie contiguously per token."""
    if (
        not _fp32_cpu(q)
        or k.dtype is not _F32
        or positions.dtype is not torch.int64
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or q.stride(-2) != q.shape[-1]
        or k.stride(-2) != k.shape[-1]
    ):
        return reference.rotary(positions, q, k, cos, sin)
    positions = positions.contiguous()
    return elementwise.rotary(positions, q, cos, sin), elementwise.rotary(positions, k, cos, sin)


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
    """reference.rotary_write_kv with this backend's rotary."""
    q, k = rotary(positions, q, k, cos, sin)
    reference.write_kv(cache, slot_mapping, k, v)
    return q


def paged_decode_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """reference.paged_decode_attention, in the C kernel (reading the blocks in place) for fp32 or bf16
    within its head, head-dim and block-size limits."""
    k_pool = cache[0]
    if (
        not _weight_dtype_cpu(q)
        or k_pool.dtype not in cpu_rows.WEIGHT_DTYPES
        or not paged_attention.fits(q.shape[1], q.shape[2], k_pool.shape[1])
    ):
        return reference.paged_decode_attention(q, cache, block_tables, context_lens, scale, sliding_window)
    out = paged_attention.paged_decode_attention(
        q.float().contiguous(), cache, block_tables, context_lens, scale, sliding_window
    )
    return out.to(q.dtype)


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
    """reference.paged_prefill_attention, a chunk at a time in the C kernel (reading the blocks in place) for
    fp32 or bf16 within its head, head-dim and block-size limits: 1.2-2.1x the speed of torch's flash attention
    on one core (256-token chunks at 0-2750 positions of context; benchmarks/results/prefill-attention-tiles).
    Chosen where prefill_attention.beats_torch()."""
    k_pool = cache[0]
    if (
        not _weight_dtype_cpu(q)
        or k_pool.dtype not in cpu_rows.WEIGHT_DTYPES
        or not paged_attention.fits(q.shape[1], q.shape[2], k_pool.shape[1])
    ):
        return reference.paged_prefill_attention(
            q, cache, query_start, start_positions, block_tables, scale, sliding_window, chunks
        )
    q32 = q.float().contiguous()
    out = torch.empty_like(q32)
    end = 0
    for chunk, (tokens, start) in enumerate(reference.prefill_chunks(query_start, start_positions, chunks)):
        begin, end = end, end + tokens
        out[begin:end] = prefill_attention.paged_prefill_attention(
            q32[begin:end], cache, block_tables[chunk], start, scale, sliding_window
        )
    return out.to(q.dtype)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor | Int8Weight,
    w2: torch.Tensor | Int8Weight,
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """reference.fused_moe, in the C kernel for fp32 or bf16 steps (weights fp32, bf16 or int8) within its
    token cap (past it the blocked GEMMs in the reference are faster); int8 experts past it as `cpu_rows.int8_gemm`
    chooses: the GEMM path or the kernel over token tiles."""
    if not _weight_dtype_cpu(hidden) or not _kernel_weight(w13) or not _kernel_weight(w2) or w2.dtype is not w13.dtype:
        return reference.fused_moe(hidden, w13, w2, weights, experts)
    tokens = hidden.shape[0]
    past_cap = not moe.fits(tokens)
    if isinstance(w13, Int8Weight):
        if cpu_rows.int8_gemm(hidden.dtype, tokens, past_cap):
            return int8_gemm.fused_moe(hidden, w13, w2, weights, experts)
    elif past_cap:
        return reference.fused_moe(hidden, w13, w2, weights, experts)
    hidden32, weights32 = hidden.float().contiguous(), weights.to(_F32).contiguous()
    if tokens <= INT8_MOE_TILE:  # every step but int8 ones past the cap (at most 128 tokens)
        return moe.moe_experts(hidden32, w13, w2, weights32, experts).to(hidden.dtype)
    tiles = [
        moe.moe_experts(
            hidden32[t : t + INT8_MOE_TILE], w13, w2, weights32[t : t + INT8_MOE_TILE], experts[t : t + INT8_MOE_TILE]
        )
        for t in range(0, tokens, INT8_MOE_TILE)
    ]
    return torch.cat(tiles).to(hidden.dtype)  # [T, H]


def linear_rows(x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
    """reference.linear_rows, in the C kernel for up to linear.max_rows() rows against an fp32 or bf16
    weight and linear.MAX_ROWS against an int8 one; an int8 weight past them, as `cpu_rows.int8_gemm` chooses
    (in bf16 from cpu_rows.INT8_GEMM_LINEAR_ROWS): the GEMM path or the kernel over row tiles."""
    if x.dim() != 2 or not _weight_dtype_cpu(x) or not _kernel_weight(weight):
        return reference.linear_rows(x, weight)
    if not cpu_rows.linear_in_kernel(x.dtype, x.shape[0], weight):
        if isinstance(weight, Int8Weight):
            return int8_gemm.linear_rows(x, weight)
        return reference.linear_rows(x, weight)
    return linear.linear_rows(x.float().contiguous(), weight).to(x.dtype)


def available() -> dict[str, bool]:
    """Which of this backend's ops have their C kernels built under the current choice of kernels."""
    attention = paged_attention.available()
    norms = elementwise.available()
    greedy = sampling.available()
    return {
        "rms_norm": norms,
        "rotary": norms,
        "rotary_write_kv": norms,
        "paged_decode_attention": attention,
        "paged_prefill_attention": prefill_attention.beats_torch(),
        "fused_moe": moe.available(),
        "linear_rows": linear.available(),
        "decoder_layers": decoder_layer.available() and attention and moe.available(),
        "causal_lm": decoder_layer.available() and attention and moe.available() and linear.available(),
        "row_argmax_logsumexp": greedy,
        "slice_greedy_stats": greedy,
        "combine_greedy": greedy,
        "apply_token_bitmask": greedy,
        "draw_tokens": greedy,
    }
