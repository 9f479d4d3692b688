"""A decoder layer through decoder_layer.c, for a step whose every token is one query over its own
block table (`AttentionMetadata.per_token`): the attention half and the MoE half are one C call
each, around the layer's two all-reduces (fp32 CPU tensors, the kernels chosen). The halves'
weights travel in two small dataclasses, the step's buffers in a third.

Legend: T tokens, H hidden size, h query heads and kv KV heads held, D
head dim, E experts held of `num_experts`, K experts per token, I intermediate size held.
"""

import ctypes
from dataclasses import dataclass

import torch

from shards.attention_metadata import AttentionMetadata
from shards.kernels import moe, native
from shards.kernels import paged_attention as attention

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SCRATCH_ARGTYPES = [_I64] * 9
_ATTENTION_ARGTYPES = [_P, _P, _P, _F, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _I64, _P, _P]
_ATTENTION_ARGTYPES += [_I64] * 6 + [_F, _I64]
_MOE_ARGTYPES = [_P, _P, _P, _F, _P, _P, _P, _P, _P] + [_I64] * 7
MAX_EXPERTS = 256


def _function(name: str, argtypes: list):
    return native.function("decoder_layer", name, argtypes)


def usable(tokens: int, heads: int, head_dim: int, block_size: int, num_experts: int) -> bool:
    """Whether a step of `tokens` tokens with these shapes fits the kernel's limits, under the current
    choice of kernels (the caller checks dtype, device and that every token has its own table)."""
    if not moe.fits(tokens):
        return False
    if heads > attention.MAX_HEADS or head_dim > attention.MAX_HEAD_DIM or head_dim % 2:
        return False
    if block_size > attention.MAX_BLOCK or num_experts > MAX_EXPERTS:
        return False
    return _function("attention_block", _ATTENTION_ARGTYPES) is not None


def max_tokens() -> int:
    """The most tokens a step may have to run in the kernel under the current choice (0: not
    available): the MoE kernel's cap."""
    return moe.max_tokens() if _function("attention_block", _ATTENTION_ARGTYPES) is not None else 0


@dataclass(slots=True)
class AttentionHalf:
    """One layer's attention half as the kernel reads it: this rank's slices, fp32, contiguous."""

    norm_weight: torch.Tensor  # [H] input_layernorm
    eps: float
    w_qkv: torch.Tensor  # [(h + 2 kv) D, H]
    w_o: torch.Tensor  # [H, h D]
    cos: torch.Tensor  # [P, D] rotary tables
    sin: torch.Tensor  # [P, D]
    heads: int  # h
    scale: float
    sliding_window: int | None

    @property
    def kv_heads(self) -> int:
        head_dim = self.cos.shape[1]
        return (self.w_qkv.shape[0] // head_dim - self.heads) // 2


@dataclass(slots=True)
class MoEHalf:
    """One layer's MoE half as the kernel reads it: the replicated gate, this rank's experts."""

    norm_weight: torch.Tensor  # [H] post_attention_layernorm
    eps: float
    gate: torch.Tensor  # [num_experts, H]
    w13: torch.Tensor  # [E, 2I, H], experts first_expert .. + E of the gate's
    w2: torch.Tensor  # [E, H, I]
    top_k: int  # K
    first_expert: int


@dataclass(slots=True)
class StepBuffers:
    """A step's working memory, shared by its layers: the kernel's scratch and the two halves'
    partial outputs [T, H] (all-reduced in place)."""

    work: torch.Tensor
    attn_out: torch.Tensor
    moe_out: torch.Tensor


def step_buffers(hidden: torch.Tensor, attention: AttentionHalf, moe: MoEHalf) -> StepBuffers:
    """Buffers for a step of hidden [T, H] through layers shaped like these halves."""
    fn = _function("decoder_layer_scratch", _SCRATCH_ARGTYPES)
    fn.restype = ctypes.c_int64  # a count of floats, not native.function's int status
    tokens, hidden_size = hidden.shape
    held, two_inter, _ = moe.w13.shape
    floats = fn(
        tokens,
        hidden_size,
        attention.heads,
        attention.kv_heads,
        attention.cos.shape[1],
        moe.gate.shape[0],
        moe.top_k,
        held,
        two_inter // 2,
    )
    return StepBuffers(torch.empty(floats), torch.empty_like(hidden), torch.empty_like(hidden))


def attention_block(
    x: torch.Tensor,
    partial: torch.Tensor | None,
    weights: AttentionHalf,
    positions: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    buffers: StepBuffers,
) -> None:
    """x [T, H] += partial; buffers.attn_out = this rank's o_proj partial of attention over the paged
    cache (RMSNorm, q/k/v, rotary, the KV write at the tokens' slots, paged attention over
    `meta.per_token()`). positions [T] int64, x contiguous."""
    k_pool, v_pool = cache
    tables, context_lens = meta.per_token()
    tokens, hidden = x.shape
    _, block_size, kv_heads, head_dim = k_pool.shape
    status = _function("attention_block", _ATTENTION_ARGTYPES)(
        x.data_ptr(),
        None if partial is None else partial.data_ptr(),
        weights.norm_weight.data_ptr(),
        weights.eps,
        weights.w_qkv.data_ptr(),
        weights.w_o.data_ptr(),
        positions.data_ptr(),
        weights.cos.data_ptr(),
        weights.sin.data_ptr(),
        weights.cos.shape[0],
        meta.slot_mapping.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        tables.data_ptr(),
        context_lens.data_ptr(),
        tables.shape[1],
        buffers.attn_out.data_ptr(),
        buffers.work.data_ptr(),
        tokens,
        hidden,
        weights.heads,
        kv_heads,
        head_dim,
        block_size,
        weights.scale,
        weights.sliding_window or 0,
    )
    if status:
        raise ValueError(f"the decoder layer kernel refused the attention block (status {status})")


def moe_block(x: torch.Tensor, partial: torch.Tensor, weights: MoEHalf, buffers: StepBuffers) -> None:
    """x [T, H] += partial; buffers.moe_out = this rank's partial MoE output (RMSNorm, gate, top-K
    routing, the experts held)."""
    tokens, hidden = x.shape
    held, two_inter, _ = weights.w13.shape
    status = _function("moe_block", _MOE_ARGTYPES)(
        x.data_ptr(),
        partial.data_ptr(),
        weights.norm_weight.data_ptr(),
        weights.eps,
        weights.gate.data_ptr(),
        weights.w13.data_ptr(),
        weights.w2.data_ptr(),
        buffers.moe_out.data_ptr(),
        buffers.work.data_ptr(),
        tokens,
        hidden,
        weights.gate.shape[0],
        weights.top_k,
        weights.first_expert,
        held,
        two_inter // 2,
    )
    if status:
        raise ValueError(f"the decoder layer kernel refused the MoE block (status {status})")
