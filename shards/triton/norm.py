"""RMSNorm with the residual add fused, in Triton, computed in fp32 as transformers does.

    rms_norm(x, weight, eps, residual=None) -> out | (out, summed)
        x [T, H] (fp32, fp16 or bf16; rows any stride apart, each row contiguous), weight [H] in
        x's dtype. Without residual: weight * norm(x), [T, H]. With residual [T, H]: s = x +
        residual (rounded to x's dtype, as the decoder layer's add is), returns (weight * norm(s),
        s), both new [T, H] tensors, from one kernel.
    usable(x) -> bool
        whether `rms_norm` can run x (Triton present, a supported dtype, a CUDA device or the
        interpreter, H at most MAX_HIDDEN).

norm(s) = s / sqrt(mean(s^2) + eps) in fp32, rounded to x's dtype before the weight multiplies
it, as `shards.layers.norm.RMSNorm` does. One program per token holds the whole row (BLOCK_H, the
next power of two of H, up to MAX_HIDDEN; 8 warps from 2048 on, 4 below).

Legend: T tokens, H hidden size.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 65536

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,  # [T, H]
        residual_ptr,  # [T, H] (unused without HAS_RESIDUAL)
        weight_ptr,  # [H]
        out_ptr,  # [T, H]
        summed_ptr,  # [T, H] (unused without HAS_RESIDUAL)
        hidden_size,
        stride_x,
        stride_r,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        ok = cols < hidden_size
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        s32 = x.to(tl.float32)
        if HAS_RESIDUAL:
            # Added in fp32 and rounded once, as torch adds 16-bit tensors.
            s = (s32 + tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(summed_ptr + row * hidden_size + cols, s, mask=ok)
            s32 = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=0) / hidden_size + eps)
        normed = (s32 * rstd).to(x.dtype).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * hidden_size + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=ok)


def _interpreted() -> bool:
    return type(_rms_norm_kernel).__name__ == "InterpretedFunction"


def usable(x: torch.Tensor) -> bool:
    """Whether `rms_norm` runs x: Triton importable, fp32/fp16/bf16, H <= MAX_HIDDEN, on a CUDA
    device (or any device when the kernel runs in the interpreter)."""
    if triton is None or x.dtype not in SUPPORTED_DTYPES or x.dim() != 2 or x.shape[1] > MAX_HIDDEN:
        return False
    return x.device.type == "cuda" or _interpreted()


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if triton is None:
        raise ValueError("rms_norm needs triton, which is not installed")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm: x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: expected x [T, H] and weight [H], got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[1]} is over {MAX_HIDDEN}")
    tensors = [x, weight] if residual is None else [x, weight, residual]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"rms_norm: weight and residual must be x's dtype {x.dtype}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("rms_norm: x, weight and residual must be on one device")
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("rms_norm: the last dimension of x, weight and residual must be contiguous")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * norm(x) [T, H]; with residual, (weight * norm(x + residual), x + residual)."""
    _check(x, weight, residual)
    tokens, hidden_size = x.shape
    out = torch.empty(tokens, hidden_size, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else out
    block_h = triton.next_power_of_2(hidden_size)
    if tokens:
        _rms_norm_kernel[(tokens,)](
            x,
            x if residual is None else residual,
            weight,
            out,
            summed,
            hidden_size,
            x.stride(0),
            x.stride(0) if residual is None else residual.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_H=block_h,
            num_warps=8 if block_h >= 2048 else 4,
        )
    return out if residual is None else (out, summed)
