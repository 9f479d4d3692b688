"""A decoder layer through decoder_layer.c, for a step whose every token is one query over its own
block table (`AttentionMetadata.per_token`): the attention half and the MoE half are one C call
each, around the layer's two all-reduces (CPU tensors, the kernels chosen): hidden, norms and rotary
tables fp32, the projection and expert weights fp32, bf16 or int8 with row scales (Int8Weight), the
router gate and the KV pools fp32 or bf16. The halves'
weights travel in two small frozen dataclasses, checked when built; the step's inputs and buffers in
a `KernelStep`, checked once when prepared (the tables, context lengths, slots and positions
range-checked against the pools), so that each layer's call checks only what is its own: its pools,
its halves and the partial sum it adds. No pointer reaches C unchecked.

Legend: T tokens, H hidden size, h query heads and kv KV heads held, D
head dim, E experts held of `num_experts`, K experts per token, I intermediate size held.
"""

import ctypes
import functools
from dataclasses import dataclass, field

import torch

from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.kernels import moe, native
from mixserve.shards.kernels import paged_attention as attention_kernel
from mixserve.shards.kernels.checks import at_most, element_type, index, pointer, require, same, weight_parts
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.quant.int8_weight import Int8Weight

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SCRATCH_ARGTYPES = [_I64] * 9
_ATTENTION_ARGTYPES = [_P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _P, _P]
_ATTENTION_ARGTYPES += [_I64] * 6 + [_F, _I64, ctypes.c_int, ctypes.c_int]
_MOE_ARGTYPES = [_P, _P, _P, _F, _P, ctypes.c_int, _P, _P, _P, _P, _P, _P] + [_I64] * 7 + [ctypes.c_int]
MAX_EXPERTS = 256


def _function(name: str, argtypes: list):
    fn = native.function("decoder_layer", name, argtypes)
    if fn is None:
        raise KernelUnavailable(f"the decoder layer kernel's {name} is not available")
    return fn


def available() -> bool:
    """Whether the kernel runs under the current choice of kernels."""
    return native.function("decoder_layer", "attention_block", _ATTENTION_ARGTYPES) is not None


def fits(tokens: int, heads: int, head_dim: int, block_size: int, num_experts: int) -> bool:
    """Whether a step of `tokens` tokens with these shapes is within the kernel's limits."""
    return (
        moe.fits(tokens)
        and attention_kernel.fits(heads, head_dim, block_size)
        and head_dim % 2 == 0
        and num_experts <= MAX_EXPERTS
    )


def max_tokens() -> int:
    """The most tokens a step may have to run in the kernel: the MoE kernel's cap."""
    return moe.max_tokens()


@dataclass(frozen=True, slots=True)
class AttentionHalf:
    """One layer's attention half as the kernel reads it: this rank's slices, contiguous; the norm and
    rotary tables fp32, w_qkv and w_o of one type, fp32, bf16 or Int8Weight."""

    norm_weight: torch.Tensor  # [H] input_layernorm
    eps: float
    w_qkv: torch.Tensor | Int8Weight  # [(h + 2 kv) D, H]
    w_o: torch.Tensor | Int8Weight  # [H, h D]
    cos: torch.Tensor  # [P, D] rotary tables
    sin: torch.Tensor  # [P, D]
    heads: int  # h
    scale: float
    sliding_window: int | None
    shape_key: tuple[int, ...] = field(init=False)  # (H, h, kv, D): what the scratch size depends on
    weight_type: int = field(init=False)  # element_type.h's number for the weights' dtype

    def __post_init__(self) -> None:
        hidden = require(self.norm_weight, "input_layernorm weight", torch.float32, 1)[0]
        weight_type, _, _, (rows, qkv_hidden) = weight_parts(self.w_qkv, "w_qkv", 2)
        o_type, _, _, (o_hidden, o_features) = weight_parts(self.w_o, "w_o", 2)
        if o_type != weight_type:
            raise TypeError(f"w_qkv and w_o must be of one type, got {self.w_qkv.dtype} and {self.w_o.dtype}")
        object.__setattr__(self, "weight_type", weight_type)
        positions, head_dim = require(self.cos, "cos", torch.float32, 2)
        if require(self.sin, "sin", torch.float32, 2) != (positions, head_dim):
            raise ValueError("the rotary tables cos and sin must have one shape")
        same("hidden sizes of the norm, w_qkv and w_o", norm=hidden, w_qkv=qkv_hidden, w_o=o_hidden)
        same("w_o input features and heads x head dim", w_o=o_features, heads=self.heads * head_dim)
        kv_rows = rows - self.heads * head_dim
        if kv_rows <= 0 or kv_rows % (2 * head_dim) or self.heads % (kv_rows // (2 * head_dim)):
            raise ValueError(f"w_qkv's {rows} rows do not hold {self.heads} query heads and whole KV heads")
        at_most("query heads", self.heads, attention_kernel.MAX_HEADS)
        at_most("head dim", head_dim, attention_kernel.MAX_HEAD_DIM)
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got {head_dim}")
        object.__setattr__(self, "shape_key", (hidden, self.heads, self.kv_heads, head_dim))

    @property
    def kv_heads(self) -> int:
        head_dim = self.cos.shape[1]
        return (self.w_qkv.shape[0] // head_dim - self.heads) // 2


@dataclass(frozen=True, slots=True)
class MoEHalf:
    """One layer's MoE half as the kernel reads it: the replicated gate (fp32 or bf16), this rank's
    experts (w13 and w2 of one type: fp32, bf16 or Int8Weight); the norm fp32."""

    norm_weight: torch.Tensor  # [H] post_attention_layernorm
    eps: float
    gate: torch.Tensor  # [num_experts, H]
    w13: torch.Tensor | Int8Weight  # [E, 2I, H], experts first_expert .. + E of the gate's
    w2: torch.Tensor | Int8Weight  # [E, H, I]
    top_k: int  # K
    first_expert: int
    shape_key: tuple[int, ...] = field(init=False)  # (num_experts, K, E, I): what the scratch size depends on
    weight_type: int = field(init=False)  # element_type.h's number for the experts' type
    gate_type: int = field(init=False)  # and for the gate's dtype

    def __post_init__(self) -> None:
        hidden = require(self.norm_weight, "post_attention_layernorm weight", torch.float32, 1)[0]
        object.__setattr__(self, "gate_type", element_type(self.gate, "gate"))
        num_experts, gate_hidden = require(self.gate, "gate", self.gate.dtype, 2)
        weight_type, _, _, (held, two_inter, w13_hidden) = weight_parts(self.w13, "w13", 3)
        w2_type, _, _, (w2_held, w2_hidden, inter) = weight_parts(self.w2, "w2", 3)
        if w2_type != weight_type:
            raise TypeError(f"w13 and w2 must be of one type, got {self.w13.dtype} and {self.w2.dtype}")
        object.__setattr__(self, "weight_type", weight_type)
        same("hidden sizes of the norm, gate, w13 and w2", norm=hidden, gate=gate_hidden, w13=w13_hidden, w2=w2_hidden)
        same("experts held in w13 and w2", w13=held, w2=w2_held)
        same("intermediate sizes (w13 rows / 2, w2 columns)", w13=two_inter // 2, w2=inter)
        at_most("experts", num_experts, MAX_EXPERTS)
        if not 0 < self.top_k <= num_experts or not 0 <= self.first_expert <= num_experts - held:
            raise ValueError(
                f"top_k {self.top_k} and experts {self.first_expert}..+{held} must lie within the gate's {num_experts}"
            )
        object.__setattr__(self, "shape_key", (num_experts, self.top_k, held, inter))


@dataclass(frozen=True, slots=True)
class KernelStep:
    """One step's checked inputs and working memory, shared by its layers: hidden [T, H] (updated in
    place), the per-token tables, the kernel's scratch and the two halves' partial outputs [T, H]
    (all-reduced in place). Built by `prepare_step`."""

    hidden: torch.Tensor
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [T, M] int64
    context_lens: torch.Tensor  # [T] int64
    pool_shape: tuple[int, int, int, int]  # every layer's pools [N, S, kv, d]
    pool_dtype: torch.dtype  # every layer's pools' dtype, fp32 or bf16
    attention_key: tuple[int, ...]  # the halves' shapes the scratch was sized for
    moe_key: tuple[int, ...]
    work: torch.Tensor
    attn_out: torch.Tensor
    moe_out: torch.Tensor


def prepare_step(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    cache: tuple[torch.Tensor, torch.Tensor],
    attention: AttentionHalf,
    moe: MoEHalf,
) -> KernelStep:
    """Check a step of hidden [T, H] (fp32, contiguous) at positions [T] over `meta.per_token()` against
    pools shaped like `cache` and layers shaped like these halves, and allocate its buffers.
    Raises TypeError / ValueError for what the kernel cannot take."""
    tokens, hidden_size = require(hidden, "hidden", torch.float32, 2)
    same("hidden sizes of hidden and the weights", hidden=hidden_size, weights=attention.w_o.shape[0])
    same("hidden sizes of the two halves", attention=attention.w_o.shape[0], moe=moe.gate.shape[1])
    positions = _index(positions, "positions", tokens)
    slots = _index(meta.slot_mapping, "slot_mapping", tokens)
    pool_shape = _, _, kv_heads, head_dim = attention_kernel.check_cache(cache)
    same("KV heads of the pools and w_qkv", pools=kv_heads, w_qkv=attention.kv_heads)
    same("head dims of the pools and the rotary tables", pools=head_dim, tables=attention.cos.shape[1])
    per_token = meta.per_token()
    if per_token is None:
        raise ValueError("the decoder layer kernel takes a step whose every token has its own block table")
    tables, context_lens = attention_kernel.check_tables(*per_token, tokens)
    floats = _scratch_floats(tokens, attention.shape_key, moe.shape_key)
    return KernelStep(
        hidden,
        positions,
        slots,
        tables,
        context_lens,
        pool_shape,
        cache[0].dtype,
        attention.shape_key,
        moe.shape_key,
        torch.empty(floats),
        torch.empty_like(hidden),
        torch.empty_like(hidden),
    )


def _index(values: torch.Tensor, name: str, tokens: int) -> torch.Tensor:
    values = index(values, name, 1)
    same(f"tokens of hidden and {name}", hidden=tokens, **{name: values.shape[0]})
    return values


@functools.lru_cache(maxsize=256)
def _scratch_floats(tokens: int, attention_key: tuple[int, ...], moe_key: tuple[int, ...]) -> int:
    fn = _function("decoder_layer_scratch", _SCRATCH_ARGTYPES)
    fn.restype = ctypes.c_int64  # a count of floats, not native.function's int status
    return fn(tokens, *attention_key, *moe_key)


def _check_partial(partial: torch.Tensor, step: KernelStep) -> None:
    if not (
        isinstance(partial, torch.Tensor)
        and partial.dtype is torch.float32
        and partial.shape == step.hidden.shape
        and partial.is_cpu
        and partial.is_contiguous()
    ):
        raise ValueError(f"partial must be a contiguous fp32 CPU tensor of hidden's shape {tuple(step.hidden.shape)}")


def attention_block(
    step: KernelStep,
    partial: torch.Tensor | None,
    weights: AttentionHalf,
    cache: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """step.hidden [T, H] += partial; step.attn_out = this rank's o_proj partial of attention over the
    paged cache (RMSNorm, q/k/v, rotary, the KV write at the tokens' slots, paged attention over the
    step's per-token tables)."""
    fn = _function("attention_block", _ATTENTION_ARGTYPES)
    if not isinstance(weights, AttentionHalf) or weights.shape_key != step.attention_key:
        raise ValueError(f"the attention half must be shaped {step.attention_key} as the step was prepared for")
    k_pool, v_pool = cache
    for pool in cache:
        if not (
            isinstance(pool, torch.Tensor)
            and pool.dtype is step.pool_dtype
            and pool.shape == step.pool_shape
            and pool.is_cpu
            and pool.is_contiguous()
        ):
            raise ValueError(f"each pool must be a contiguous {step.pool_dtype} CPU tensor of shape {step.pool_shape}")
    if partial is not None:
        _check_partial(partial, step)
    x = step.hidden
    tokens, hidden = x.shape
    blocks, block_size, kv_heads, head_dim = step.pool_shape
    status = fn(
        x.data_ptr(),
        None if partial is None else partial.data_ptr(),
        weights.norm_weight.data_ptr(),
        weights.eps,
        weight_address(weights.w_qkv),
        weight_address(weights.w_o),
        scale_address(weights.w_qkv),
        scale_address(weights.w_o),
        step.positions.data_ptr(),
        weights.cos.data_ptr(),
        weights.sin.data_ptr(),
        weights.cos.shape[0],
        step.slot_mapping.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        step.block_tables.data_ptr(),
        step.context_lens.data_ptr(),
        step.block_tables.shape[1],
        blocks,
        step.attn_out.data_ptr(),
        step.work.data_ptr(),
        tokens,
        hidden,
        weights.heads,
        kv_heads,
        head_dim,
        block_size,
        weights.scale,
        weights.sliding_window or 0,
        weights.weight_type,
        element_type(k_pool, "k_pool"),
    )
    if status:
        raise ValueError(f"the decoder layer kernel refused the attention block: {attention_refusal(status)}")


def weight_address(weight: torch.Tensor | Int8Weight) -> int:
    """The address of what C reads of a weight the halves checked: its codes for an Int8Weight."""
    return (weight.codes if isinstance(weight, Int8Weight) else weight).data_ptr()


def scale_address(weight: torch.Tensor | Int8Weight) -> int | None:
    """The address of an Int8Weight's row scales; None (NULL) for a floating-point weight."""
    return pointer(weight.scale) if isinstance(weight, Int8Weight) else None


def attention_refusal(status: int) -> str:
    if status == 30:
        return "a slot outside the pools"
    if status == 40:
        return "weights neither fp32, bf16 nor int8 with scales, or pools neither fp32 nor bf16"
    if 10 < status < 20:
        return "a position past the rotary tables (or an odd head dim)"
    if 20 < status < 30:
        return attention_kernel.refusal(status - 20)
    return f"status {status}"


def moe_block(step: KernelStep, partial: torch.Tensor, weights: MoEHalf) -> None:
    """step.hidden [T, H] += partial; step.moe_out = this rank's partial MoE output (RMSNorm, gate,
    top-K routing, the experts held)."""
    fn = _function("moe_block", _MOE_ARGTYPES)
    if not isinstance(weights, MoEHalf) or weights.shape_key != step.moe_key:
        raise ValueError(f"the MoE half must be shaped {step.moe_key} as the step was prepared for")
    _check_partial(partial, step)
    x = step.hidden
    tokens, hidden = x.shape
    held, two_inter, _ = weights.w13.shape
    status = fn(
        x.data_ptr(),
        partial.data_ptr(),
        weights.norm_weight.data_ptr(),
        weights.eps,
        weights.gate.data_ptr(),
        weights.gate_type,
        weight_address(weights.w13),
        weight_address(weights.w2),
        scale_address(weights.w13),
        scale_address(weights.w2),
        step.moe_out.data_ptr(),
        step.work.data_ptr(),
        tokens,
        hidden,
        weights.gate.shape[0],
        weights.top_k,
        weights.first_expert,
        held,
        two_inter // 2,
        weights.weight_type,
    )
    if status:
        raise ValueError(f"the decoder layer kernel refused the MoE block (status {status})")
