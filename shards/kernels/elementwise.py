"""RMSNorm and rotary embedding through the C kernels (elementwise.c) for fp32 CPU tensors.

Each function returns None where the torch path should run instead (another dtype or device, the
kernels not chosen), so the layers keep one spelling of the math in torch.
Legend: T tokens, H hidden size, h heads, d head dim, P positions in the tables.
"""

import ctypes

import torch

from shards.kernels import native

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_NORM_ARGTYPES = [_P, _P, _P, _I64, _I64, ctypes.c_float]
_ROTARY_ARGTYPES = [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64]


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension of x [T, H], or None."""
    if x.dim() != 2 or not _fp32_cpu(x, weight):
        return None
    fn = native.function("elementwise", "rms_norm", _NORM_ARGTYPES)
    if fn is None:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def rotary(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [T, h, d] (each token's heads contiguous; tokens any stride apart) rotated by positions [T]
    with the tables cos and sin [P, d]; a new [T, h, d] tensor, or None."""
    if x.dim() != 3 or not _fp32_cpu(x, cos, sin) or positions.dtype != torch.int64:
        return None
    tokens, heads, head_dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != head_dim or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    fn = native.function("elementwise", "rotary", _ROTARY_ARGTYPES)
    if fn is None:
        return None
    positions = positions.contiguous()
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
        cos.shape[0],
    )
    if status:
        raise ValueError(
            f"rotary kernel refused head_dim {head_dim} or a position past {cos.shape[0]} (status {status})"
        )
    return out
