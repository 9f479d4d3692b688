"""The CPU backend: the C kernels (shards/kernels) for CPU tensors. Each op checks the shape
limits of its kernel here, in one place, and takes the torch reference for what it cannot take
(another dtype or device, more heads or tokens than the kernel holds); the kernels' wrappers then
check every argument before C sees a pointer.

bf16: a model held in bf16 runs in torch as transformers runs it (bf16 activations, fp32 softmax),
and the kernels that read weights or the KV cache (linear_rows, fused_moe, paged_decode_attention,
decoder_layers) read them in bf16 in place, with fp32 activations and fp32 accumulation (a matmul's
input rows rounded to bf16 for the CPU's bf16 dot product where it has one: rows_times_weight.h):
each such op widens its bf16 activations on entry and rounds its result to bf16
on return, and the decoder layer kernel keeps a step's residual stream in fp32 across all its
layers. The norms run in C in bf16 too, rounding where transformers rounds; rotary stays fp32-only
(in bf16 the torch reference runs it); the greedy statistics read the logits, fp32 in every dtype.

int8-wo: the same kernels read weight-only int8 weights (Int8Weight: codes and row scales) in place
where they read fp32 or bf16 ones. Past the MoE kernel's cap (prefill chunks, large batches), and for a
linear from INT8_GEMM_LINEAR_ROWS rows, an int8 step in bf16 on a CPU with avx512_bf16 dequantizes the
weights it uses into scratch for torch's bf16 GEMM (shards.ops.int8_gemm); in fp32, or without
avx512_bf16, the kernels run uncapped over row tiles, which beats a dequantized fp32 GEMM; kernels
without vector loops (plain C) leave it to the GEMM path (benchmarks/results/int8-prefill,
int8-gemm-crossover-0.8b).

Legend: T tokens, H hidden size, h query heads, d head dim, B decoding sequences, R rows.
"""

import functools

import torch
from torch import nn

from mixserve.shards import devices, ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.kernels import (
    checks,
    decoder_layer,
    decoder_stack,
    elementwise,
    linear,
    moe,
    paged_attention,
    sampling,
)
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.ops import int8_gemm, reference
from mixserve.shards.ops.cpu_logits import apply_token_bitmask as apply_token_bitmask
from mixserve.shards.ops.cpu_logits import combine_greedy as combine_greedy
from mixserve.shards.ops.cpu_logits import draw_tokens as draw_tokens
from mixserve.shards.ops.cpu_logits import row_argmax_logsumexp as row_argmax_logsumexp
from mixserve.shards.ops.cpu_logits import slice_greedy_stats as slice_greedy_stats
from mixserve.shards.quant.int8_weight import Int8Weight
from mixserve.shards.shm_collectives import SharedMemoryGroup

_F32 = torch.float32
# The dtypes the weight- and cache-reading kernels take their weights and pools in.
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
# The ops whose kernels a bf16 model leaves to torch (shards.ops.select): rotary, whose outputs transformers
# rounds to bf16 where the kernels keep fp32. Every other kernel reads bf16 weights or KV pools (the norm
# rounds as transformers does: a bf16 decode step's final norm took ~40 us in torch's seven ops on the demo,
# ~17 in C), or the logits, which sampling widens to fp32 in every dtype (the greedy statistics in torch took
# ~75 us of a one-row bf16 step and ~300 us of a six-row verification on the demo's 32000 tokens, in C
# ~25 and ~110).
FP32_ONLY_OPS = ("rotary", "rotary_write_kv")
# From this many rows an int8 linear in bf16 takes the GEMM path where the CPU has avx512_bf16. On the 0.8B
# shape at one of two ranks (benchmarks/results/int8-gemm-crossover-0.8b) the kernel, its codes in bf16's
# dot product, was 1.05-1.6x faster at 17-40 rows of q/k/v and o and the GEMM path from 48; the LM head's
# crossover is 64, its 32 MB of bf16 scratch missing the cache. The MoE kernel beat the GEMM path at
# every token count up to its cap (1.25x at a 129-token prefill, 1.03x at 256), so int8 experts take
# the GEMM path only past the cap.
INT8_GEMM_LINEAR_ROWS = 48
# Tokens per call of the MoE kernel for int8 steps past its cap: bounds its scratch (P (2I + 2H) floats)
# and keeps a tile's rows in cache; 1024 tokens as 4 tiles ran ~15 % faster than as one call.
INT8_MOE_TILE = 256


def _fp32_cpu(x: torch.Tensor) -> bool:
    return x.dtype is _F32 and x.is_cpu


def _weight_dtype_cpu(x: torch.Tensor) -> bool:
    return x.dtype in _WEIGHT_DTYPES and x.is_cpu


def _kernel_weight(weight: torch.Tensor | Int8Weight) -> bool:
    """Whether the kernels read this weight in place: fp32 or bf16, or int8 codes, contiguous on the CPU."""
    data = weight.codes if isinstance(weight, Int8Weight) else weight
    return (isinstance(weight, Int8Weight) or data.dtype in _WEIGHT_DTYPES) and data.is_cpu and data.is_contiguous()


@functools.cache
def _bf16_gemm() -> bool:
    """Whether torch's bf16 GEMM has the bf16 dot product here (about 4x its fp32 GEMM on one core)."""
    return devices.cpu_has_bf16()


def _int8_gemm(dtype: torch.dtype, rows: int, past_kernel_cap: bool, bf16_from: int | None = None) -> bool:
    """Whether an int8 step of `rows` rows in `dtype` takes the dequantize-then-GEMM path: in bf16 where the
    GEMM has the bf16 dot product, from `bf16_from` rows where given, else past the kernel's cap; elsewhere
    only past the kernel's cap, and only where the kernels lack vector loops (with them they beat a
    dequantized fp32 GEMM at every size measured)."""
    if dtype is torch.bfloat16 and _bf16_gemm():
        return past_kernel_cap if bf16_from is None else rows >= bf16_from
    return past_kernel_cap and moe.vector_floats() < 8


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """reference.rms_norm, the norm in the C kernel for [T, H] in fp32, or in bf16 with its roundings."""
    if x.dim() != 2 or not x.is_cpu or x.dtype not in _WEIGHT_DTYPES or weight.dtype is not x.dtype:
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
        or k_pool.dtype not in _WEIGHT_DTYPES
        or not paged_attention.fits(q.shape[1], q.shape[2], k_pool.shape[1])
    ):
        return reference.paged_decode_attention(q, cache, block_tables, context_lens, scale, sliding_window)
    out = paged_attention.paged_decode_attention(
        q.float().contiguous(), cache, block_tables, context_lens, scale, sliding_window
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
    token cap (past it the blocked GEMMs in the reference are faster); int8 experts past it as `_int8_gemm`
    chooses: the GEMM path or the kernel over token tiles."""
    if not _weight_dtype_cpu(hidden) or not _kernel_weight(w13) or not _kernel_weight(w2) or w2.dtype is not w13.dtype:
        return reference.fused_moe(hidden, w13, w2, weights, experts)
    tokens = hidden.shape[0]
    past_cap = not moe.fits(tokens)
    if isinstance(w13, Int8Weight):
        if _int8_gemm(hidden.dtype, tokens, past_cap):
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
    weight and linear.MAX_ROWS against an int8 one; an int8 weight past them, as `_int8_gemm` chooses
    (in bf16 from INT8_GEMM_LINEAR_ROWS): the GEMM path or the kernel over row tiles."""
    if x.dim() != 2 or not _weight_dtype_cpu(x) or not _kernel_weight(weight):
        return reference.linear_rows(x, weight)
    if not _linear_in_kernel(x.dtype, x.shape[0], weight):
        if isinstance(weight, Int8Weight):
            return int8_gemm.linear_rows(x, weight)
        return reference.linear_rows(x, weight)
    return linear.linear_rows(x.float().contiguous(), weight).to(x.dtype)


def _linear_in_kernel(dtype: torch.dtype, rows: int, weight: torch.Tensor | Int8Weight) -> bool:
    """Whether linear_rows runs `rows` rows in `dtype` against a weight the kernel reads in its kernel:
    up to the measured cap (shards/head_rows.py) against an fp32 or bf16 weight; an int8 weight up to
    linear.MAX_ROWS, and past them where `_int8_gemm` leaves it there."""
    if isinstance(weight, Int8Weight):
        return not _int8_gemm(dtype, rows, rows > linear.MAX_ROWS, INT8_GEMM_LINEAR_ROWS)
    return rows <= linear.max_rows()


def causal_lm(
    model: nn.Module,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    logits_indices: torch.Tensor | None,
    gather_logits: bool = True,
    greedy_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """reference.causal_lm in one C call (decoder_stack with the model's ends, stack_ends.c) where the step
    fits the decoder stack, the model's ends fit the call (`kernel_ends`) and linear_rows would run its LM
    head rows in the kernel: the embedding, every layer, the final norm, the LM head and the greedy
    statistics, the same numbers as through the separate ops; else the reference, through the other ops.
    A step past the kernel's cap where the warm-up chose tiles (`_tile`) is one such call per tile, in
    order, each row asked taken from its token's tile. Every torch op this saves would be the first after
    a kernel that streamed the weights through the cache, which makes each ~20-60 us
    (benchmarks/results/decode-step-ends)."""
    ends, halves = model.kernel_ends(), model.layers[0].kernel_halves()
    tokens = token_ids.shape[0]
    rows = tokens if logits_indices is None else logits_indices.shape[0]
    tile = _tile(tokens)
    stack = None
    if (
        ends is not None
        and halves is not None
        and _linear_in_kernel(ends.dtype, min(rows, tile), ends.head)
        and _step_fits(halves, tile, ends.dtype, kv_cache, meta)
    ):
        residual = torch.empty(tile, ends.hidden_size)  # [T, H] fp32, the embedding's rows first
        first = meta if tile == tokens else meta.tokens(0, tile)
        step = decoder_layer.prepare_step(residual, positions[:tile], first, kv_cache.layer(0), *halves)
        stack, shm = _stack(model.layers, kv_cache, step)
    if stack is None:
        return reference.causal_lm(
            model, token_ids, positions, kv_cache, meta, logits_indices, gather_logits, greedy_stats
        )
    logits = torch.empty(rows, ends.vocab_rows)  # [R, P]
    token_ids = checks.index(token_ids, "token_ids", 1)  # int64, contiguous, held while C reads it
    rows_asked = None if logits_indices is None else checks.index(logits_indices, "logits_indices", 1)
    if tile == tokens:
        decoder_stack.run(step, stack, shm, ends.step(token_ids, rows_asked, logits, greedy_stats))
    else:
        for start, end in _spans(tokens, tile):
            if start:
                residual = torch.empty(end - start, ends.hidden_size)
                step = decoder_layer.prepare_step(
                    residual, positions[start:end], meta.tokens(start, end), kv_cache.layer(0), *halves
                )
            # Each row asked goes to the tile holding its token, and comes back to its place in the step's order.
            where = torch.arange(start, end) if rows_asked is None else _rows_within(rows_asked, start, end)
            asked = None if rows_asked is None else rows_asked[where] - start
            out, stats = torch.empty(where.shape[0], ends.vocab_rows), None
            if greedy_stats is not None:
                stats = torch.empty(where.shape[0], 3, dtype=torch.float64)
            decoder_stack.run(step, stack, shm, ends.step(token_ids[start:end], asked, out, stats))
            logits[where] = out
            if stats is not None:
                greedy_stats[where] = stats
    return model.lm_head.gather(logits) if gather_logits else logits


def _tile(tokens: int) -> int:
    """Tokens per decoder layer kernel call for a step of `tokens`: all of them, or the measured cap where
    the step is past it and the warm-up found the kernel clearly ahead of torch's layers at the cap
    (Ops.decoder_layers_tiles). Tiles run in order, each over the K/V the ones before it wrote."""
    current = ops.current()
    cap = current.decoder_layers_max_tokens
    return cap if current.decoder_layers_tiles and tokens > cap else tokens


def _spans(tokens: int, tile: int) -> list[tuple[int, int]]:
    """[start, end) of each tile of `tile` tokens of a step of `tokens`, in order."""
    return [(start, min(start + tile, tokens)) for start in range(0, tokens, tile)]


def _rows_within(rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Indices into rows [R] of the rows whose token is one of [start, end)."""
    return ((rows >= start) & (rows < end)).nonzero().squeeze(1)


def decoder_layers(
    layers: nn.ModuleList,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """reference.decoder_layers through the decoder layer kernel where the step fits it: every layer in
    one C call (decoder_stack, its all-reduces over shared memory in C) where the group allows, else each
    layer as two C calls around its two all-reduces. A step fits where every token is one query over its
    own block table (a decode step, or a small one with prefill chunks), fp32 or bf16, weights not
    quantized by bitsandbytes, shapes within its limits; int8 weights too, in bf16 as well (a 129-token
    prefill of the 0.8B shape's int8 weights in bf16 took 119 ms in it against 129 layer by layer with
    the GEMM path's linears: int8-gemm-crossover-0.8b), and a longer one in tiles where the warm-up chose
    them (`_tile`). The residual stream stays fp32 across the layers (bf16 hidden widened here, rounded
    on return)."""
    halves, tokens = layers[0].kernel_halves(), hidden.shape[0]
    tile = _tile(tokens)
    if halves is None or not hidden.is_cpu or not _step_fits(halves, tile, hidden.dtype, kv_cache, meta):
        return reference.decoder_layers(layers, positions, hidden, kv_cache, meta)
    if tile < tokens:
        spans = _spans(tokens, tile)
        return torch.cat(
            [_layers_in_kernel(layers, positions[s:e], hidden[s:e], kv_cache, meta.tokens(s, e)) for s, e in spans]
        )
    return _layers_in_kernel(layers, positions, hidden, kv_cache, meta)


def _layers_in_kernel(
    layers: nn.ModuleList, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
) -> torch.Tensor:
    """decoder_layers in the kernel, for a step that fits it whole."""
    halves = layers[0].kernel_halves()
    residual = hidden.float().contiguous()  # [T, H] fp32, updated in place
    step = decoder_layer.prepare_step(residual, positions, meta, kv_cache.layer(0), *halves)
    stack, shm = _stack(layers, kv_cache, step)
    if stack is not None:
        decoder_stack.run(step, stack, shm)
        return residual.to(hidden.dtype)
    pending = None
    for index, layer in enumerate(layers):
        pending = decoder_layer_step(layer, step, pending, kv_cache.layer(index))
    residual += pending
    return residual.to(hidden.dtype)


_STACKS = decoder_stack.StackCache()


def _stack(
    layers: nn.ModuleList, kv_cache: KVCache, step: decoder_layer.KernelStep
) -> tuple[decoder_stack.Stack | None, SharedMemoryGroup | None]:
    """The layers as one decoder_stack call, and the shared-memory group it all-reduces over (None on one
    rank); no stack where an all-reduce would leave the shared memory (torch's collectives, a step too
    big for its slots) or the layers differ in what the call takes once. Every layer of a model is built
    with the model's one group (MixtralModel), so layer 0's attention says which."""
    group = layers[0].self_attn.o_proj.group
    shm = None
    if group.world_size > 1:
        shm = group.shm
        if shm is None or not shm.fits(step.attn_out):
            return None, None
    halves = [layer.kernel_halves() for layer in layers]
    if any(h is None for h in halves):
        return None, None
    return _STACKS.get(layers, kv_cache, halves), shm


def decoder_layer_step(
    layer: nn.Module,
    step: decoder_layer.KernelStep,
    pending: torch.Tensor | None,
    cache: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One DecoderLayer's forward through the kernel: adds `pending` (the previous layer's summed MoE
    output, None for the first layer) to step.hidden [T, H] in place and returns this layer's summed
    MoE output, which the caller adds after the last layer."""
    attention, experts = layer.kernel_halves()
    decoder_layer.attention_block(step, pending, attention, cache)
    attn_sum = layer.self_attn.o_proj.group.all_reduce(step.attn_out)
    decoder_layer.moe_block(step, attn_sum, experts)
    return layer.block_sparse_moe.group.all_reduce(step.moe_out)


def _step_fits(halves: tuple, tokens: int, dtype: torch.dtype, kv_cache: KVCache, meta: AttentionMetadata) -> bool:
    attention, experts = halves
    _, heads, _, head_dim = attention.shape_key
    return (
        meta.per_token() is not None
        and dtype in _WEIGHT_DTYPES
        and kv_cache.keys.dtype in _WEIGHT_DTYPES
        and decoder_layer.fits(tokens, heads, head_dim, kv_cache.block_size, experts.shape_key[0])
    )


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
