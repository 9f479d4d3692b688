"""Which path a CPU op takes for a step of R rows: the C kernels up to their caps (measured at warm-up
where shards/kernel_tokens.py and shards/head_rows.py time them), past them torch's GEMMs, or for
weight-only int8 the dequantize-then-GEMM path (shards.ops.int8_gemm). Shared by the CPU backend's ops
(shards/ops/cpu.py) and its decoder-layer ops (shards/ops/cpu_layers.py).
"""

import functools

import torch

from mixserve.shards import devices
from mixserve.shards.kernels import linear, moe
from mixserve.shards.quant.int8_weight import Int8Weight

# From this many rows an int8 linear in bf16 takes the GEMM path where the CPU has avx512_bf16. On the 0.8B
# shape at one of two ranks (benchmarks/results/int8-gemm-crossover-0.8b) the kernel, its codes in bf16's
# dot product, was 1.05-1.6x faster at 17-40 rows of q/k/v and o and the GEMM path from 48; the LM head's
# crossover is 64, its 32 MB of bf16 scratch missing the cache. The MoE kernel beat the GEMM path at
# every token count up to its cap (1.25x at a 129-token prefill, 1.03x at 256), so int8 experts take
# the GEMM path only past the cap.
INT8_GEMM_LINEAR_ROWS = 48

# The dtypes the weight- and cache-reading kernels take their weights and pools in.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def bf16_gemm() -> bool:
    """Whether torch's bf16 GEMM has the bf16 dot product here (about 4x its fp32 GEMM on one core)."""
    return devices.cpu_has_bf16()


def int8_gemm(dtype: torch.dtype, rows: int, past_kernel_cap: bool, bf16_from: int | None = None) -> bool:
    """Whether an int8 step of `rows` rows in `dtype` takes the dequantize-then-GEMM path: in bf16 where the
    GEMM has the bf16 dot product, from `bf16_from` rows where given, else past the kernel's cap; elsewhere
    only past the kernel's cap, and only where the kernels lack vector loops (with them they beat a
    dequantized fp32 GEMM at every size measured)."""
    if dtype is torch.bfloat16 and bf16_gemm():
        return past_kernel_cap if bf16_from is None else rows >= bf16_from
    return past_kernel_cap and moe.vector_floats() < 8


def linear_in_kernel(dtype: torch.dtype, rows: int, weight: torch.Tensor | Int8Weight) -> bool:
    """Whether linear_rows runs `rows` rows in `dtype` against a weight the kernel reads in its kernel:
    up to the measured cap (shards/head_rows.py) against an fp32 or bf16 weight; an int8 weight up to
    linear.MAX_ROWS, and past them where `int8_gemm` leaves it there."""
    if isinstance(weight, Int8Weight):
        return not int8_gemm(dtype, rows, rows > linear.MAX_ROWS, INT8_GEMM_LINEAR_ROWS)
    return rows <= linear.max_rows()
