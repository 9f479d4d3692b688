"""y = x W^T for a few rows against a large weight through the C kernel (linear.c), behind a checked,
torch-shaped call: x fp32, the weight fp32, bf16 or int8 with row scales (Int8Weight; widened in
registers, the int8 rows' dots scaled; a bf16 weight meets x rounded to bf16 in the CPU's bf16 dot
product where it has one, rows_times_weight.h), fp32 accumulation.

Measured here against MKL (fp32, one thread, the weight not in cache): for the demo's LM head
(8192 x 256) 1.1x at 1 row, 1.7-1.8x at 4-8 rows, 1.2x at 16, slower from 32 rows; for the small
attention projections no faster at any row count, so only the LM head takes it. Where torch's GEMM
overtakes it depends on the CPU and the dtype, so a served model's head is timed at warm-up
(shards/head_rows.py).
Legend: R rows of x, K input features, N output features.
"""

import ctypes

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.checks import pointer, require, same, weight_parts
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.quant.int8_weight import Int8Weight

# Past this many rows MKL's blocked GEMM beat streaming the weight once per group of four rows of it (fp32,
# an Intel Xeon): the cap of heads nothing timed. A served model's LM head is timed at warm-up
# (shards/head_rows.py), and its cap is never below this one.
MAX_ROWS = 16
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, ctypes.c_int, _P, _P, _I64, _I64, _I64]


def _kernel():
    return native.function("linear", "linear_rows", _ARGTYPES)


# The row cap this process measured for its LM head (shards/head_rows.py), or None.
_measured_rows: list[int | None] = [None]


def set_measured_rows(rows: int | None) -> None:
    """Let fp32 and bf16 weights take the kernel for up to `rows` rows (None: MAX_ROWS)."""
    _measured_rows[0] = rows


def max_rows() -> int:
    """The most rows x may have for an fp32 or bf16 weight to take the kernel: the cap measured at warm-up
    where one is set, else MAX_ROWS."""
    return MAX_ROWS if _measured_rows[0] is None else _measured_rows[0]


def available() -> bool:
    """Whether the kernel runs under the current choice of kernels."""
    return _kernel() is not None


def linear_rows(x: torch.Tensor, weight: "torch.Tensor | Int8Weight") -> torch.Tensor:
    """x [R, K] @ weight [N, K]^T -> [R, N] fp32; contiguous CPU tensors, x fp32, weight fp32, bf16 or an
    Int8Weight (each row's dot times its scale)."""
    fn = _kernel()
    if fn is None:
        raise KernelUnavailable("the linear kernel is not available")
    rows, features = require(x, "x", torch.float32, 2)
    weight_type, data, scale, (outputs, weight_features) = weight_parts(weight, "weight", 2)
    same("input features of x and weight", x=features, weight=weight_features)
    out = torch.empty(rows, outputs, dtype=torch.float32)
    if fn(x.data_ptr(), data.data_ptr(), weight_type, pointer(scale), out.data_ptr(), rows, features, outputs):
        raise ValueError(f"the linear kernel refused x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    return out
