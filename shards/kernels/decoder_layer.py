"""A decoder layer of a decode step through decoder_layer.c: the attention half and the MoE half are
one C call each, around the layer's two all-reduces (fp32 CPU tensors, the kernels chosen).

Legend: T tokens (one per decoding sequence), H hidden size, h query heads and kv KV heads held, D
head dim, E experts held of `num_experts`, K experts per token, I intermediate size held.
"""

import ctypes

import torch

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
    """Whether a decode step of `tokens` tokens with these shapes fits the kernel's limits, under the
    current choice of kernels (the caller checks dtype, device and that every token decodes)."""
    if tokens > moe.MAX_TOKENS and tokens > moe.max_tokens():
        return False
    if heads > attention.MAX_HEADS or head_dim > attention.MAX_HEAD_DIM or head_dim % 2:
        return False
    if block_size > attention.MAX_BLOCK or num_experts > MAX_EXPERTS:
        return False
    return _function("attention_block", _ATTENTION_ARGTYPES) is not None


def scratch(
    tokens: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    num_experts: int,
    top_k: int,
    held: int,
    inter: int,
) -> torch.Tensor:
    """Working memory for either call of a step (reused by every layer)."""
    fn = _function("decoder_layer_scratch", _SCRATCH_ARGTYPES)
    fn.restype = ctypes.c_int64  # a count of floats, not native.function's int status
    return torch.empty(fn(tokens, hidden, heads, kv_heads, head_dim, num_experts, top_k, held, inter))


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def attention_block(
    x: torch.Tensor,
    partial: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    work: torch.Tensor,
    heads: int,
    scale: float,
    sliding_window: int | None,
) -> None:
    """x [T, H] += partial; out [T, H] = this rank's o_proj partial of attention over the paged cache
    (RMSNorm, q/k/v, rotary, the KV write at `slots`, paged attention). Every tensor contiguous,
    positions, slots, tables and lengths int64."""
    k_pool, v_pool = cache
    tokens, hidden = x.shape
    _, block_size, kv_heads, head_dim = k_pool.shape
    status = _function("attention_block", _ATTENTION_ARGTYPES)(
        x.data_ptr(),
        _pointer(partial),
        norm_weight.data_ptr(),
        eps,
        w_qkv.data_ptr(),
        w_o.data_ptr(),
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        cos.shape[0],
        slots.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        block_tables.shape[1],
        out.data_ptr(),
        work.data_ptr(),
        tokens,
        hidden,
        heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        sliding_window or 0,
    )
    if status:
        raise ValueError(f"the decoder layer kernel refused the attention block (status {status})")


def moe_block(
    x: torch.Tensor,
    partial: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    out: torch.Tensor,
    work: torch.Tensor,
    top_k: int,
    first_expert: int,
) -> None:
    """x [T, H] += partial; out [T, H] = this rank's partial MoE output (RMSNorm, gate, top-K routing,
    the experts held: w13 [E, 2I, H], w2 [E, H, I], experts first_expert .. + E of gate's)."""
    tokens, hidden = x.shape
    held, two_inter, _ = w13.shape
    status = _function("moe_block", _MOE_ARGTYPES)(
        x.data_ptr(),
        partial.data_ptr(),
        norm_weight.data_ptr(),
        eps,
        gate.data_ptr(),
        w13.data_ptr(),
        w2.data_ptr(),
        out.data_ptr(),
        work.data_ptr(),
        tokens,
        hidden,
        gate.shape[0],
        top_k,
        first_expert,
        held,
        two_inter // 2,
    )
    if status:
        raise ValueError(f"the decoder layer kernel refused the MoE block (status {status})")
