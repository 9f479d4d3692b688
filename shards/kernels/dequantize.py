"""Int8 codes widened back to floats through the C kernel (dequantize.c), behind a checked, torch-shaped
call: what the int8 GEMM path (shards.ops.int8_gemm) feeds torch's matmul past the few-row kernels' caps.

Legend: N rows (output channels), K codes per row.
"""

import ctypes

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.checks import element_type, require, same
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.quant.int8_weight import Int8Weight

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, ctypes.c_int, _P, _I64, _I64]


def _kernel():
    return native.function("dequantize", "dequantize_int8", _ARGTYPES)


def available() -> bool:
    """Whether the kernel runs under the current choice of kernels."""
    return _kernel() is not None


def dequantize_into(weight: Int8Weight, out: torch.Tensor) -> torch.Tensor:
    """Write weight's dequantized values (codes times row scale in fp32, stored as out's dtype: fp32, or
    bf16 rounded to nearest even) into `out` [N, K], contiguous on the CPU; returns `out`. The same values
    as Int8Weight.dequantize(out.dtype)."""
    fn = _kernel()
    if fn is None:
        raise KernelUnavailable("the dequantize kernel is not available")
    rows, features = require(weight.codes, "codes", torch.int8, 2)
    same("rows of codes and scale", codes=rows, scale=require(weight.scale, "scale", torch.float32, 1)[0])
    same("shapes of codes and out", codes=weight.codes.numel(), out=out.numel())
    out_type = element_type(out, "out")
    require(out, "out", out.dtype, 2)
    same("rows of codes and out", codes=rows, out=out.shape[0])
    if fn(weight.codes.data_ptr(), weight.scale.data_ptr(), out_type, out.data_ptr(), rows, features):
        raise ValueError(f"the dequantize kernel refused codes {tuple(weight.codes.shape)}")
    return out
