"""The CPU backend: the C kernels (shards/kernels) for CPU tensors. Each op checks the shape
limits of its kernel here, in one place, and takes the torch reference for what it cannot take
(another dtype or device, more heads or tokens than the kernel holds); the kernels' wrappers then
check every argument before C sees a pointer.

bf16: a model held in bf16 runs in torch as transformers runs it (bf16 activations, fp32 softmax),
and the kernels that read weights or the KV cache (linear_rows, fused_moe, paged_decode_attention,
decoder_layers) read them in bf16 in place, widening them in registers, with fp32 activations and
fp32 accumulation: each such op widens its bf16 activations on entry and rounds its result to bf16
on return, and the decoder layer kernel keeps a step's residual stream in fp32 across all its
layers. The elementwise ops (norms, rotary) and the greedy statistics stay fp32-only: in bf16 the
torch reference runs them.

Legend: T tokens, H hidden size, h query heads, d head dim, B decoding sequences, R rows.
"""

import torch
from torch import nn

from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.kernels import decoder_layer, elementwise, linear, moe, paged_attention, sampling
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.ops import reference

_F32 = torch.float32
# The dtypes the weight- and cache-reading kernels take their weights and pools in.
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
# The ops whose kernels run for a bf16 model (shards.ops.select leaves the others to torch there): those
# reading weights or the KV cache, and the grammar mask, which sees the fp32 logits of every dtype.
BF16_OPS = ("linear_rows", "fused_moe", "paged_decode_attention", "decoder_layers", "apply_token_bitmask")


def _fp32_cpu(x: torch.Tensor) -> bool:
    return x.dtype is _F32 and x.device.type == "cpu"


def _weight_dtype_cpu(x: torch.Tensor) -> bool:
    return x.dtype in _WEIGHT_DTYPES and x.device.type == "cpu"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """reference.rms_norm, the norm in the C kernel for fp32 [T, H]."""
    if x.dim() != 2 or not _fp32_cpu(x) or weight.dtype is not _F32:
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
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """reference.fused_moe, in the C kernel for fp32 or bf16 steps within its token cap (past it the
    blocked GEMMs in the reference are faster)."""
    if (
        not _weight_dtype_cpu(hidden)
        or w13.dtype not in _WEIGHT_DTYPES
        or w2.dtype is not w13.dtype
        or not moe.fits(hidden.shape[0])
    ):
        return reference.fused_moe(hidden, w13, w2, weights, experts)
    out = moe.moe_experts(hidden.float().contiguous(), w13, w2, weights.to(_F32).contiguous(), experts)
    return out.to(hidden.dtype)


def linear_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """reference.linear_rows, in the C kernel for up to linear.MAX_ROWS fp32 or bf16 rows."""
    if (
        x.dim() != 2
        or x.shape[0] > linear.MAX_ROWS
        or not _weight_dtype_cpu(x)
        or weight.dtype not in _WEIGHT_DTYPES
        or not weight.is_contiguous()
    ):
        return reference.linear_rows(x, weight)
    return linear.linear_rows(x.float().contiguous(), weight).to(x.dtype)


def decoder_layers(
    layers: nn.ModuleList,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """reference.decoder_layers, each layer as two C calls around its two all-reduces where the step
    fits the decoder layer kernel: every token one query over its own block table (a decode step, or
    a small one with prefill chunks), fp32 or bf16, weights not quantized, shapes within its limits.
    The residual stream stays fp32 across the layers (bf16 hidden widened here, rounded on return)."""
    halves = layers[0].kernel_halves()
    if halves is None or not _step_fits(halves, hidden, kv_cache, meta):
        return reference.decoder_layers(layers, positions, hidden, kv_cache, meta)
    residual = hidden.float().contiguous()  # [T, H] fp32, updated in place
    step = decoder_layer.prepare_step(residual, positions, meta, kv_cache.layer(0), *halves)
    pending = None
    for index, layer in enumerate(layers):
        pending = decoder_layer_step(layer, step, pending, kv_cache.layer(index))
    residual += pending
    return residual.to(hidden.dtype)


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


def _step_fits(halves: tuple, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> bool:
    attention, experts = halves
    _, heads, _, head_dim = attention.shape_key
    return (
        meta.per_token() is not None
        and _weight_dtype_cpu(hidden)
        and kv_cache.keys.dtype in _WEIGHT_DTYPES
        and decoder_layer.fits(hidden.shape[0], heads, head_dim, kv_cache.block_size, experts.shape_key[0])
    )


def row_argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.row_argmax_logsumexp, in the C kernel for fp32 rows holding no NaN or infinity."""
    if logits.dim() == 2 and logits.shape[1] and _fp32_cpu(logits):
        stats = sampling.row_argmax_logsumexp(logits.contiguous())
        if stats is not None:
            return stats
    return reference.row_argmax_logsumexp(logits)


def slice_greedy_stats(logits: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """reference.slice_greedy_stats, in the C kernel for an fp32 slice with contiguous rows holding no
    NaN or infinity."""
    if logits.dim() == 2 and logits.shape[1] and _fp32_cpu(logits) and logits.stride(1) == 1:
        packed = sampling.slice_greedy_stats(logits, vocab_start)
        if packed is not None:
            return packed
    return reference.slice_greedy_stats(logits, vocab_start)


def combine_greedy(every: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """reference.combine_greedy, in the C kernel for float64 numbers on the CPU."""
    if every.dtype is not torch.float64 or every.device.type != "cpu":
        return reference.combine_greedy(every)
    return sampling.combine_greedy(every.contiguous())


def apply_token_bitmask(
    logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, vocab_start: int, vocab_size: int
) -> torch.Tensor:
    """reference.apply_token_bitmask, in the C kernel for fp32 logits and int32 masks on the CPU: a copy of
    the logits with the disallowed tokens set to MASKED_LOGIT."""
    if not (_fp32_cpu(logits) and logits.dim() == 2 and logits.shape[1] and bitmask.device.type == "cpu"):
        return reference.apply_token_bitmask(logits, rows, bitmask, vocab_start, vocab_size)
    masked = logits.clone(memory_format=torch.contiguous_format)
    sampling.apply_token_bitmask(
        masked, rows, bitmask.to(torch.int32).contiguous(), vocab_start, vocab_size, reference.MASKED_LOGIT
    )
    return masked


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
        "row_argmax_logsumexp": greedy,
        "slice_greedy_stats": greedy,
        "combine_greedy": greedy,
        "apply_token_bitmask": greedy,
    }
