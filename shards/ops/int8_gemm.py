"""Weight-only int8 steps past the few-row kernels' caps (prefill chunks, large decode batches): each
weight a step uses is dequantized into one reused scratch buffer, in the activations' dtype, and a
blocked torch GEMM (oneDNN; vdpbf16ps in bf16 where the CPU has avx512_bf16) reads it. At these row
counts the GEMM's arithmetic, not the weight's bytes, sets the time, so widening the codes once per
call costs little, while the kernels that stream the codes run fp32 FMAs at a fraction of the GEMM's
rate. The MoE dequantizes only the experts the step routes tokens to. The codes are widened by the C
kernel (dequantize.c) where it is built, else by torch; both give Int8Weight.dequantize's values, so
the results equal the torch reference's.

Legend: R rows, N out features, K in features, T tokens, H hidden size, E_l experts held, I_l
intermediate size held, K_e experts per token.
"""

import threading

import torch
import torch.nn.functional as F

from mixserve.shards.kernels import dequantize
from mixserve.shards.ops import reference
from mixserve.shards.quant.int8_weight import Int8Weight

# One flat buffer per thread and dtype, grown to the largest weight seen (a shard's LM head slice, as a
# rule) and kept: a step uses its weights one at a time, and a shard steps on one thread.
_local = threading.local()


def _scratch_for(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    buffers: dict[torch.dtype, torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    numel = shape.numel()
    flat = buffers.get(dtype)
    if flat is None or flat.numel() < numel:
        flat = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(shape)


def dense_in_scratch(weight: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] dequantized to `dtype` (fp32 or bf16) in the scratch buffer, valid until the next
    call for that dtype."""
    out = _scratch_for(weight.shape, dtype)
    if dequantize.available():
        return dequantize.dequantize_into(weight, out)
    return torch.mul(weight.codes, weight.scale.unsqueeze(-1), out=out)  # computed in fp32, stored in dtype


def linear_rows(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x [R, K] (fp32 or bf16) @ weight [N, K]^T -> [R, N] in x's dtype."""
    return F.linear(x, dense_in_scratch(weight, x.dtype))


def fused_moe(
    hidden: torch.Tensor, w13: Int8Weight, w2: Int8Weight, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """reference.fused_moe for int8 experts w13 [E_l, 2 I_l, H], w2 [E_l, H, I_l], each routed expert's
    weights dequantized into the scratch buffer in hidden's dtype (fp32 or bf16)."""
    return reference.grouped_experts(hidden, w13, w2, weights, experts, dense_in_scratch)
