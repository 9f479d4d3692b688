"""Fused MoE experts in Triton: two grouped GEMMs over pairs aligned to experts on the device.

    fused_moe(hidden, w13, w2, weights, experts) -> out
        hidden [T, H] (fp32, fp16 or bf16), w13 [E_l, 2 I, H] (w1 rows then w3 rows), w2 [E_l, H, I]
        in hidden's dtype, routing weights [T, K] fp32, expert ids [T, K] (int32 or int64) in
        [0, E_l], E_l meaning held by another rank; returns this rank's partial output [T, H] in
        hidden's dtype, what `shards.ops.reference.fused_moe` returns.
    usable(hidden, w13) -> bool
        whether `fused_moe` can run these tensors (Triton present, a supported dtype, a CUDA device
        or the interpreter).

Steps, none of which waits on the host (the call is capturable in a CUDA graph):
1. `align_pairs` (moe_align.py) sorts the T K pairs by expert and pads every expert's group to a
   multiple of BLOCK_M; pairs held elsewhere get no row.
2. The gate/up GEMM: each program takes one block of BLOCK_M sorted rows (one expert) and BLOCK_N
   columns of I, gathers the rows' tokens from hidden, accumulates gate and up in fp32 against
   w13's w1 and w3 rows and writes SiLU(gate) * up to the pairs' rows of an [P, I] buffer.
3. The down GEMM: the same blocks against w2, scaled by each pair's routing weight (fp32), written
   to the pairs' rows of a zeroed [T, K, H] buffer (pairs held elsewhere stay zero).
4. A sum over K gives [T, H] (one add for Mixtral's K = 2); each pair owns its row, so no atomics.
Grids are sized from shapes (the alignment's upper bound on blocks); programs past the padded
total exit at once.

Block sizes (`block_config`), by the average rows per held expert, T K / E_l, a shape-only number,
measured on an H200 at a Mixtral-8x7B rank's shapes in bf16 (benchmarks/results/gpu-decode-profile,
the MoE alone in a CUDA graph) among tiles that also fit an A100's 164 KiB of shared memory:
- up to 4 (decode of a few sequences): BLOCK_M 16 (the smallest `tl.dot` tile, least padding),
  BLOCK_N 32, BLOCK_K 256, 4 warps: weight-bandwidth bound; narrow N tiles give more programs for
  the few blocks, long K tiles keep loads wide. Best or within 1 % of the best of six tiles at 1, 2,
  4, 8 and 16 tokens (1 token: 62 us against 71 with N 64, K 128; 16 tokens: 181 against 195 with
  K 128 and four stages);
- up to 64: BLOCK_M 32, BLOCK_N 64, BLOCK_K 128, 4 warps (64 tokens: 183 us against 212 with M 16);
- above (prefill): BLOCK_M 64, BLOCK_N 128, BLOCK_K 64, 8 warps: compute bound, larger tiles
  reuse each weight tile across more rows (not re-measured).
Three pipeline stages for 2-byte dtypes; fp32 takes two and at most a 128 K tile, so
the gate/up GEMM's tiles (two weight tiles a stage) stay within an A100's shared memory in every
dtype (tests/test_triton_moe.py compiles each for sm80 and checks).

The interpreter's `tl.dot` is wrong for bf16 (triton-lang/triton#11584), so kernels built for the
interpreter cast bf16 tiles to fp32 before the dot; on a GPU bf16 tiles go to the tensor cores.
fp32 inputs use IEEE fp32 dots (not TF32), matching torch's default matmul.

Legend: T tokens, H hidden size, K experts per token, P = T K pairs, E_l experts held by this
rank, I intermediate size per rank, R sorted rows, B blocks.
"""

from dataclasses import dataclass

import torch

from mixserve.shards.triton.moe_align import align_pairs

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class BlockConfig:
    """Tile sizes and launch parameters of both grouped GEMMs."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def block_config(num_pairs: int, num_experts: int, dtype: torch.dtype) -> BlockConfig:
    """The default tiles for P pairs over E_l held experts (see the module docstring)."""
    rows_per_expert = num_pairs / num_experts
    wide = dtype != torch.float32  # 2-byte tiles: three stages and the long K tile fit
    stages = 3 if wide else 2
    if rows_per_expert <= 4:
        return BlockConfig(16, 32, 256 if wide else 128, 4, stages)
    if rows_per_expert <= 64:
        return BlockConfig(32, 64, 128 if wide else 64, 4, stages)
    return BlockConfig(64, 128, 64, 8, stages)


if triton is not None:

    @triton.jit
    def _gate_up_kernel(
        hidden_ptr,  # [T, H]
        w13_ptr,  # [E_l, 2 I, H]
        inter_ptr,  # [P, I]
        sorted_pairs_ptr,  # [R]
        block_expert_ptr,  # [B]
        total_ptr,  # [1]
        num_pairs,
        hidden_size,
        inter_size,
        stride_ht,
        stride_we,
        stride_wn,
        stride_pt,
        TOP_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0)
        if block * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pairs = tl.load(sorted_pairs_ptr + rows)  # [BM]
        valid = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] in I
        col_ok = cols < inter_size
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = hidden_ptr + tokens[:, None] * stride_ht + ks[None, :]  # [BM, BK]
        w_base = w13_ptr + expert * stride_we + ks[:, None]  # [BK, 1]
        gate_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn  # [BK, BN], w1 rows transposed
        up_ptrs = w_base + (cols[None, :] + inter_size).to(tl.int64) * stride_wn  # w3 rows
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden_size, BLOCK_K):
            k_ok = ks + k0 < hidden_size
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            wu = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            gate = tl.dot(a, wg, gate, input_precision=PRECISION)
            up = tl.dot(a, wu, up, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        act = gate / (1.0 + tl.exp(-gate)) * up  # SiLU(gate) * up, [BM, BN] fp32
        out_ptrs = inter_ptr + pairs[:, None].to(tl.int64) * stride_pt + cols[None, :]
        tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(
        inter_ptr,  # [P, I]
        w2_ptr,  # [E_l, H, I]
        weights_ptr,  # [P] fp32
        out_ptr,  # [P, H]
        sorted_pairs_ptr,  # [R]
        block_expert_ptr,  # [B]
        total_ptr,  # [1]
        num_pairs,
        hidden_size,
        inter_size,
        stride_pt,
        stride_we,
        stride_wn,
        stride_ot,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0)
        if block * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pairs = tl.load(sorted_pairs_ptr + rows)  # [BM]
        valid = pairs < num_pairs
        pair_rows = pairs.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] in H
        col_ok = cols < hidden_size
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = inter_ptr + pair_rows[:, None] * stride_pt + ks[None, :]  # [BM, BK]
        w_ptrs = w2_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter_size, BLOCK_K):
            k_ok = ks + k0 < inter_size
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        scale = tl.load(weights_ptr + pairs, mask=valid, other=0.0)  # [BM] fp32
        acc = acc * scale[:, None]
        out_ptrs = out_ptr + pair_rows[:, None] * stride_ot + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def _interpreted(kernel: object) -> bool:
    """Whether `kernel` was built for the interpreter (TRITON_INTERPRET=1 when its module loaded)."""
    return type(kernel).__name__ == "InterpretedFunction"


def usable(hidden: torch.Tensor, w13: torch.Tensor | None) -> bool:
    """Whether `fused_moe` runs for these tensors: Triton importable, fp32/fp16/bf16 weights in the
    activations' dtype, on a CUDA device (or any device when the kernels run in the interpreter)."""
    if triton is None or w13 is None or hidden.dtype not in SUPPORTED_DTYPES or w13.dtype != hidden.dtype:
        return False
    return hidden.device.type == "cuda" or _interpreted(_gate_up_kernel)


def _check(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> None:
    if triton is None:
        raise ValueError("fused_moe needs triton, which is not installed")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused_moe: hidden dtype {hidden.dtype} is not one of {SUPPORTED_DTYPES}")
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"fused_moe: w13 {w13.dtype} and w2 {w2.dtype} must be hidden's dtype {hidden.dtype}")
    if weights.dtype != torch.float32:
        raise ValueError(f"fused_moe: routing weights must be float32, got {weights.dtype}")
    if experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: expert ids must be int32 or int64, got {experts.dtype}")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or weights.dim() != 2:
        raise ValueError(
            f"fused_moe: expected hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], weights [T, K]; got "
            f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}, {tuple(weights.shape)}"
        )
    (tokens, hidden_size), (num_experts, two_inter, _) = hidden.shape, w13.shape
    if w13.shape[2] != hidden_size or two_inter % 2 or w2.shape != (num_experts, hidden_size, two_inter // 2):
        raise ValueError(
            f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match hidden size {hidden_size}"
        )
    if weights.shape[0] != tokens or experts.shape != weights.shape:
        raise ValueError(
            f"fused_moe: weights {tuple(weights.shape)} and experts {tuple(experts.shape)} must both be [{tokens}, K]"
        )
    devices = {t.device for t in (hidden, w13, w2, weights, experts)}
    if len(devices) != 1:
        raise ValueError(f"fused_moe: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not all(t.is_contiguous() for t in (hidden, w13, w2, weights, experts)):
        raise ValueError("fused_moe: hidden, w13, w2, weights and experts must be contiguous")


def fused_moe(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """This rank's partial MoE output [T, H] for hidden [T, H] routed by weights and expert ids
    [T, K] (ids == E_l: held elsewhere, no contribution); see the module docstring."""
    _check(hidden, w13, w2, weights, experts)
    tokens, hidden_size = hidden.shape
    num_experts, inter_size = w13.shape[0], w13.shape[1] // 2
    top_k = experts.shape[1]
    num_pairs = tokens * top_k
    config = block_config(num_pairs, num_experts, hidden.dtype)
    aligned = align_pairs(experts, num_experts, config.block_m)
    num_blocks = aligned.block_expert.shape[0]
    dot_fp32 = hidden.dtype == torch.bfloat16 and _interpreted(_gate_up_kernel)
    precision = "ieee" if hidden.dtype == torch.float32 or dot_fp32 else None
    inter = torch.empty(num_pairs, inter_size, dtype=hidden.dtype, device=hidden.device)  # [P, I]
    out = torch.zeros(tokens, top_k, hidden_size, dtype=hidden.dtype, device=hidden.device)  # [T, K, H]
    tiles = dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_FP32=dot_fp32,
        PRECISION=precision,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    _gate_up_kernel[(num_blocks, triton.cdiv(inter_size, config.block_n))](
        hidden,
        w13,
        inter,
        aligned.sorted_pairs,
        aligned.block_expert,
        aligned.total,
        num_pairs,
        hidden_size,
        inter_size,
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        inter.stride(0),
        TOP_K=top_k,
        **tiles,
    )
    _down_kernel[(num_blocks, triton.cdiv(hidden_size, config.block_n))](
        inter,
        w2,
        weights,
        out,
        aligned.sorted_pairs,
        aligned.block_expert,
        aligned.total,
        num_pairs,
        hidden_size,
        inter_size,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(1),
        **tiles,
    )
    if top_k == 2:
        # One elementwise launch: a reduction over K took ~5 us of a 117 us decode layer on an H200
        # (benchmarks/results/gpu-decode-profile/after-align); both add in fp32 and round once.
        return torch.add(out[:, 0], out[:, 1])  # [T, H]
    return out.sum(dim=1)  # [T, H]
