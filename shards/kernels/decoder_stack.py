"""Every decoder layer of a step in one C call (decoder_layer.c's decoder_stack), the all-reduces
between the halves included (shm_exchange.c's, over the group's shared-memory segment; none on one
rank).

Per layer, the two calls of decoder_layer.py cost a few microseconds of Python each (their checks,
ctypes' conversion of some thirty arguments) and the all-reduces a torch round trip each: on a small
model, whose layer is tens of microseconds of C, that is a sizeable share of a decode step. A
`Stack` holds every layer's pointers in one C array, checked when built: the halves as the kernel
reads them, and the KV pools, which must all be shaped as layer 0's that the step was prepared with.
What the layers share (shapes, types, the attention scale and window, the routing) must be alike, or
there is no stack and the layers run one by one.

Legend: L layers, T tokens, H hidden size.
"""

import ctypes
import weakref
from dataclasses import dataclass

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.checks import element_type
from mixserve.shards.kernels.decoder_layer import (
    AttentionHalf,
    KernelStep,
    MoEHalf,
    attention_refusal,
    scale_address,
    weight_address,
)
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.kernels.stack_ends import StackEnds

_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class StackLayer(ctypes.Structure):
    """decoder_layer.c's StackLayer: one layer's weights and KV pools."""

    _fields_ = [
        ("attn_norm", _P),
        ("w_qkv", _P),
        ("w_o", _P),
        ("qkv_scale", _P),
        ("o_scale", _P),
        ("cos_table", _P),
        ("sin_table", _P),
        ("k_pool", _P),
        ("v_pool", _P),
        ("moe_norm", _P),
        ("gate", _P),
        ("w13", _P),
        ("w2", _P),
        ("w13_scale", _P),
        ("w2_scale", _P),
        ("attn_eps", _F),
        ("moe_eps", _F),
    ]


_ARGTYPES = [_I64, _P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _P] + [_I64] * 6
_ARGTYPES += [_F, _I64, _INT, _INT, _INT] + [_I64] * 5 + [_P, _P] + [_I64] * 5 + [_P, _P]


def _function():
    fn = native.function("decoder_layer", "decoder_stack", _ARGTYPES)
    if fn is None:
        raise KernelUnavailable("the decoder layer kernel's decoder_stack is not available")
    return fn


def _shared(attention: AttentionHalf, moe: MoEHalf) -> tuple:
    """What decoder_stack takes once for every layer."""
    return (
        attention.shape_key,
        attention.weight_type,
        attention.scale,
        attention.sliding_window,
        attention.cos.shape[0],
        moe.shape_key,
        moe.weight_type,
        moe.gate_type,
        moe.first_expert,
    )


@dataclass(frozen=True, slots=True)
class Stack:
    """Every layer's pointers for decoder_stack. The halves are held here; the pools' memory is the KV
    cache's, which must outlive the stack (StackCache holds it by a weak reference)."""

    layers: ctypes.Array  # [L] StackLayer
    halves: tuple[tuple[AttentionHalf, MoEHalf], ...]
    pool_shape: tuple[int, ...]
    pool_dtype: torch.dtype
    kv_type: int  # element_type.h's number for the pools' dtype

    @property
    def attention(self) -> AttentionHalf:
        """Layer 0's attention half: the shapes and settings every layer shares."""
        return self.halves[0][0]

    @property
    def moe(self) -> MoEHalf:
        return self.halves[0][1]


def build(halves: list[tuple[AttentionHalf, MoEHalf]], pools: list[tuple[torch.Tensor, torch.Tensor]]) -> Stack | None:
    """The stack of these layers' halves over these pools (one pair per layer), or None where the
    layers differ in what decoder_stack takes once, or a pool is not shaped and typed as layer 0's."""
    first = _shared(*halves[0])
    shape, dtype = tuple(pools[0][0].shape), pools[0][0].dtype
    for (attention, moe), layer_pools in zip(halves, pools, strict=True):
        if _shared(attention, moe) != first:
            return None
        for pool in layer_pools:
            if not (pool.device.type == "cpu" and pool.is_contiguous() and tuple(pool.shape) == shape):
                return None
            if pool.dtype is not dtype:
                return None
    layers = (StackLayer * len(halves))()
    for entry, (attention, moe), (k_pool, v_pool) in zip(layers, halves, pools, strict=True):
        entry.attn_norm = attention.norm_weight.data_ptr()
        entry.w_qkv, entry.w_o = weight_address(attention.w_qkv), weight_address(attention.w_o)
        entry.qkv_scale, entry.o_scale = scale_address(attention.w_qkv), scale_address(attention.w_o)
        entry.cos_table, entry.sin_table = attention.cos.data_ptr(), attention.sin.data_ptr()
        entry.k_pool, entry.v_pool = k_pool.data_ptr(), v_pool.data_ptr()
        entry.moe_norm = moe.norm_weight.data_ptr()
        entry.gate = moe.gate.data_ptr()
        entry.w13, entry.w2 = weight_address(moe.w13), weight_address(moe.w2)
        entry.w13_scale, entry.w2_scale = scale_address(moe.w13), scale_address(moe.w2)
        entry.attn_eps, entry.moe_eps = attention.eps, moe.eps
    return Stack(layers, tuple(halves), shape, dtype, element_type(pools[0][0], "k_pool"))


class StackCache:
    """The stacks of a few layer lists over their KV caches (a draft model's beside the model's). An entry
    holds its layers and cache by weak references, so a new object at a freed one's address is never
    taken for it, and serves only while the layers' halves are the objects it was built from (loading
    weights again makes new ones)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, tuple, Stack | None]] = {}

    def get(self, layers, kv_cache, halves: list[tuple[AttentionHalf, MoEHalf]]) -> Stack | None:
        """The stack of `layers` (whose halves are `halves`) over `kv_cache`, built unless held already."""
        key = (id(layers), id(kv_cache))
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry[0]() is layers
            and entry[1]() is kv_cache
            and all(a is b for a, b in zip(entry[2], halves, strict=True))
        ):
            return entry[3]
        stack = build(halves, [kv_cache.layer(i) for i in range(len(halves))])
        self._entries.pop(key, None)
        if len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[key] = (weakref.ref(layers), weakref.ref(kv_cache), tuple(halves), stack)
        return stack


def run(step: KernelStep, stack: Stack, shm, ends: StackEnds | None = None) -> None:
    """Every layer of `step` (prepared over layer 0's pools with layer 0's halves): step.hidden [T, H]
    ends as the residual stream after the last layer. `shm` is the group's SharedMemoryGroup, whose
    all-reduces the call makes (it must fit step.attn_out), or None for one rank. With `ends` (a model's
    ModelEnds.step for this step's T tokens), step.hidden is first filled with the tokens' embeddings,
    and the rows asked for go through the final norm and the LM head into the ends' logits."""
    if (
        step.attention_key != stack.attention.shape_key
        or step.moe_key != stack.moe.shape_key
        or step.pool_shape != stack.pool_shape
        or step.pool_dtype is not stack.pool_dtype
    ):
        raise ValueError("the stack's layers and pools must be shaped as the step was prepared for")
    attention, moe = stack.attention, stack.moe
    x = step.hidden
    tokens, hidden = x.shape
    blocks, block_size, kv_heads, head_dim = step.pool_shape
    num_experts, top_k, held, inter = moe.shape_key
    if shm is None:
        pointers, first_call, timeout_ns = (None, None, 0, 1, 0), 0, 0
    else:
        if not shm.fits(step.attn_out):
            raise ValueError("the step's partial outputs do not fit the group's shared-memory slots")
        calls = 2 * len(stack.layers) + (ends is not None)
        pointers, first_call, timeout_ns = shm.pointers, shm.reserve_calls(calls), shm.timeout_ns()
    if ends is not None and (ends.T != tokens or 2 * ends.R * hidden > step.work.shape[0]):
        raise ValueError(f"the ends' {ends.T} tokens and {ends.R} rows do not fit the step's {tokens} tokens")
    failed = ctypes.c_int64(-1)
    status = _function()(
        len(stack.layers),
        ctypes.addressof(stack.layers),
        x.data_ptr(),
        step.positions.data_ptr(),
        attention.cos.shape[0],
        step.slot_mapping.data_ptr(),
        step.block_tables.data_ptr(),
        step.context_lens.data_ptr(),
        step.block_tables.shape[1],
        blocks,
        step.attn_out.data_ptr(),
        step.moe_out.data_ptr(),
        step.work.data_ptr(),
        tokens,
        hidden,
        attention.heads,
        kv_heads,
        head_dim,
        block_size,
        attention.scale,
        attention.sliding_window or 0,
        attention.weight_type,
        stack.kv_type,
        moe.gate_type,
        num_experts,
        top_k,
        moe.first_expert,
        held,
        inter,
        *pointers,
        first_call,
        timeout_ns,
        ctypes.addressof(failed),
        None if ends is None else ctypes.addressof(ends),
    )
    if status == -1:
        raise shm.timed_out(first_call + (ends is not None) + 2 * failed.value)
    if status >= 200:
        raise ValueError(f"the decoder stack's head refused its rows (status {status - 200})")
    if status >= 100:
        raise ValueError(f"the decoder layer kernel refused layer {failed.value}'s MoE block (status {status - 100})")
    if status:
        reason = attention_refusal(status)
        raise ValueError(f"the decoder layer kernel refused layer {failed.value}'s attention block: {reason}")
