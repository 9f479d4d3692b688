"""y = x W^T for a few rows against a large weight through the C kernel (linear.c), else F.linear.

Measured here against MKL (fp32, one thread, the weight not in cache): for the demo's LM head
(8192 x 256) 1.1x at 1 row, 1.7-1.8x at 4-8 rows, 1.2x at 16, slower from 32 rows; for the small
attention projections no faster at any row count, so only the LM head takes it.
Legend: R rows of x, K input features, N output features.
"""

import ctypes

import torch
import torch.nn.functional as F

from shards.kernels import native

# Past this many rows MKL's blocked GEMM beats streaming the weight once per group of four rows of it.
MAX_ROWS = 16
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, _P, _I64, _I64, _I64]


def _kernel():
    return native.function("linear", "linear_rows", _ARGTYPES)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ weight [N, K]^T -> [R, N]: the C kernel for up to MAX_ROWS fp32 CPU rows, F.linear otherwise."""
    if (
        x.dim() != 2
        or x.shape[0] > MAX_ROWS
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or not weight.is_contiguous()
    ):
        return F.linear(x, weight)
    fn = _kernel()
    if fn is None:
        return F.linear(x, weight)
    x = x.contiguous()
    rows, features = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    if fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, features, weight.shape[0]):
        raise ValueError(f"the linear kernel refused x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    return out
