"""The C expert MLPs (moe.c) behind a checked, torch-shaped call, for decode-sized batches: hidden
fp32, the experts' weights fp32, bf16 or int8 with row scales (Int8Weight; widened in registers, the
int8 rows' dots scaled; bf16 weights, and a bf16 model's int8 codes, meet their inputs rounded to bf16
in the CPU's bf16 dot product where it has one, rows_times_weight.h), fp32 accumulation.

Legend: T tokens, H hidden size, K experts per token, E experts held, I intermediate size held.
"""

import ctypes

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.checks import index, pointer, require, same, weight_parts
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.quant.int8_weight import Int8Weight

# Past this many tokens MKL's blocked GEMM beats streaming each expert's weights per row group:
# 64 with 8-float vectors; with 16-float ones (AVX-512) the kernel still wins at 128 (1.24-1.36x the
# torch path on the demo's experts, 1.0x at 256-512 with bf16 widened to fp32), and with bf16's dot
# product a whole decoder layer of the demo at 256 tokens. These are the caps of steps nothing timed.
MAX_TOKENS_BY_VECTOR_FLOATS = {16: 256}
MAX_TOKENS = 64
# A served model's cap is measured at warm-up (shards/kernel_tokens.py) up to this many tokens whatever
# the build's cap, so a model whose experts torch runs faster sooner (the 0.8B shape: from 64 tokens) is
# capped there and one whose kernel leads longer keeps it. On an AVX2-only AMD EPYC the 8-float build's
# 64 was too low: the fp32 demo's layers led torch's at 128 tokens (37.5 against 53.4 ms) and were level
# at 256; bf16 weights without the dot product, which torch's bf16 GEMM lacks too, led by 3.4-4.4x at
# every size (benchmarks/results/avx2-epyc-demo).
TIMED_MAX_TOKENS = 256
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, _P, _P, _P, ctypes.c_int, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64]


def _kernel():
    return native.function("moe", "moe_experts", _ARGTYPES)


def vector_floats() -> int:
    """The floats per vector of the kernels' matmul loop in this build (16 with AVX-512, 8 with AVX2, 1
    in plain C; 0: not available)."""
    width = native.function("moe", "moe_vector_floats", [])
    return 0 if width is None else width()


def bf16_dot_products() -> bool:
    """Whether this build's matmuls meet bf16 weights with their inputs rounded to bf16 in the CPU's bf16
    dot product (AVX512_BF16, K a multiple of 32); False where they widen the weights (or do not run)."""
    dot = native.function("moe", "moe_bf16_dot_products", [])
    return dot is not None and bool(dot())


def int8_int16_dot_products() -> bool:
    """Whether this build's matmuls meet a bf16 model's int8 codes with their inputs quantized to 15 bits in
    an int16 dot product: VNNI's (AVX512_VNNI, K a multiple of 32 up to 16384; rows_times_codes_dpwssd.h) or,
    without AVX-512, AVX2's multiply-add (K a multiple of 16 up to 8192; rows_times_codes_maddwd.h)."""
    dot = native.function("moe", "moe_int8_int16_dot_products", [])
    return dot is not None and bool(dot())


def amx_tile_products() -> bool:
    """Whether this process's matmuls meet bf16 weights of 1 MiB and more (K 512 and more) with their inputs
    rounded to bf16 in AMX's tile dot product (AMX_BF16, the tile state granted by the kernel;
    rows_times_weight_amx.h)."""
    tiles = native.function("moe", "moe_amx_tile_products", [])
    return tiles is not None and bool(tiles())


# A lower cap this process measured for its model (shards/kernel_tokens.py), or None.
_measured_cap: list[int | None] = [None]


def set_measured_cap(tokens: int | None) -> None:
    """Cap the tokens a step may have for the kernel at `tokens`, in place of the build's own cap (None:
    the build's); shards/kernel_tokens.py measures it up to TIMED_MAX_TOKENS."""
    _measured_cap[0] = tokens


def max_tokens() -> int:
    """The most tokens a step may have for its experts to run in the kernel (0: not available): the cap
    measured at warm-up where one is set, else the build's."""
    width = vector_floats()
    if width == 0:
        return 0
    if _measured_cap[0] is not None:
        return _measured_cap[0]
    return MAX_TOKENS_BY_VECTOR_FLOATS.get(width, MAX_TOKENS)


def fits(tokens: int) -> bool:
    """Whether a step of `tokens` tokens is within the kernel's token cap (the kernel may still be
    unavailable); decode-sized steps never ask the library for its vector width."""
    small = MAX_TOKENS if _measured_cap[0] is None else min(MAX_TOKENS, _measured_cap[0])
    return tokens <= small or tokens <= max_tokens()


def available() -> bool:
    """Whether the kernel runs under the current choice of kernels."""
    return _kernel() is not None


def moe_experts(
    hidden: torch.Tensor,
    w13: "torch.Tensor | Int8Weight",
    w2: "torch.Tensor | Int8Weight",
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """This rank's partial MoE output [T, H] for hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], routing
    weights and expert ids [T, K] (ids >= E, held by another rank, are skipped): as the fused_moe reference.
    CPU tensors, w13 and w2 of one type (fp32, bf16, or both Int8Weights), the rest fp32; raises TypeError /
    ValueError for arguments the kernel cannot take."""
    fn = _kernel()
    if fn is None:
        raise KernelUnavailable("the MoE kernel is not available")
    tokens, hidden_size = require(hidden, "hidden", torch.float32, 2)
    weight_type, w13_data, w13_scale, (held, two_inter, w13_hidden) = weight_parts(w13, "w13", 3)
    w2_type, w2_data, w2_scale, (w2_held, w2_hidden, inter) = weight_parts(w2, "w2", 3)
    if w2_type != weight_type:
        raise TypeError(f"w13 and w2 must be of one type, got {w13.dtype} and {w2.dtype}")
    route_tokens, top_k = require(weights, "weights", torch.float32, 2)
    experts = index(experts, "experts", 2)
    same("hidden sizes of hidden, w13 and w2", hidden=hidden_size, w13=w13_hidden, w2=w2_hidden)
    same("experts held in w13 and w2", w13=held, w2=w2_held)
    same("intermediate sizes (w13 rows / 2, w2 columns)", w13=two_inter // 2, w2=inter)
    if two_inter % 2:
        raise ValueError(f"w13 must stack w1 and w3: {two_inter} rows is odd")
    same("tokens of hidden, weights and experts", hidden=tokens, weights=route_tokens, experts=experts.shape[0])
    same("experts per token of weights and experts", weights=top_k, experts=experts.shape[1])
    pairs = tokens * top_k
    out = torch.empty_like(hidden)
    scratch = torch.empty(pairs * (two_inter + 2 * hidden_size) + 2 * (pairs + 2 * (held + 1)), dtype=torch.float32)
    status = fn(
        hidden.data_ptr(),
        weights.data_ptr(),
        experts.data_ptr(),
        w13_data.data_ptr(),
        w2_data.data_ptr(),
        weight_type,
        pointer(w13_scale),
        pointer(w2_scale),
        out.data_ptr(),
        scratch.data_ptr(),
        tokens,
        hidden_size,
        top_k,
        held,
        two_inter // 2,
    )
    if status:
        raise ValueError(f"the MoE kernel refused the step (status {status}): negative expert ids")
    return out
