"""RMSNorm and rotary embedding through the C kernels (elementwise.c) behind checked, torch-shaped
calls, for fp32 CPU tensors (RMSNorm also for bf16 ones).

Legend: T tokens, H hidden size, h heads, d head dim, P positions in the tables.
"""

import ctypes

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.checks import require, same
from mixserve.shards.kernels.native import KernelUnavailable

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_NORM_ARGTYPES = [_P, _P, _P, _I64, _I64, ctypes.c_float]
_ROTARY_ARGTYPES = [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64]


def available() -> bool:
    """Whether the kernels run under the current choice of kernels."""
    return native.function("elementwise", "rms_norm", _NORM_ARGTYPES) is not None


def _function(name: str, argtypes: list):
    fn = native.function("elementwise", name, argtypes)
    if fn is None:
        raise KernelUnavailable(f"the {name} kernel is not available")
    return fn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension of x [T, H] (contiguous), fp32 or bf16
    with a weight of x's dtype; in bf16 rounded where transformers rounds (the normalised x, then its
    product with the weight)."""
    dtype = torch.bfloat16 if x.dtype is torch.bfloat16 else torch.float32
    fn = _function("rms_norm" if dtype is torch.float32 else "rms_norm_bf16", _NORM_ARGTYPES)
    tokens, hidden = require(x, "x", dtype, 2)
    same("hidden sizes of x and weight", x=hidden, weight=require(weight, "weight", dtype, 1)[0])
    out = torch.empty_like(x)
    fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), tokens, hidden, eps)
    return out


def rotary(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, h, d] fp32 (each token's heads contiguous; tokens any stride apart) rotated by positions
    [T] int64 with the tables cos and sin [P, d]; a new [T, h, d] tensor."""
    fn = _function("rotary", _ROTARY_ARGTYPES)
    tokens, heads, head_dim = require(x, "x", torch.float32, 3, contiguous=False)
    if x.stride(2) != 1 or x.stride(1) != head_dim:
        raise ValueError(f"x must hold each token's heads contiguously, got strides {x.stride()}")
    table = require(cos, "cos", torch.float32, 2)
    if require(sin, "sin", torch.float32, 2) != table:
        raise ValueError(f"cos {table} and sin {tuple(sin.shape)} must have one shape")
    same("head dims of x and the tables", x=head_dim, tables=table[1])
    same("tokens of x and positions", x=tokens, positions=require(positions, "positions", torch.int64, 1)[0])
    out = torch.empty(tokens, heads, head_dim, dtype=torch.float32)
    status = fn(
        x.data_ptr(),
        x.stride(0),
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        head_dim,
        table[0],
    )
    if status:
        raise ValueError(f"rotary kernel refused head_dim {head_dim} or a position past {table[0]} (status {status})")
    return out
