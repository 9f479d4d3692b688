"""Mixtral's routing in one Triton program a token: softmax over the router logits, the top K, and
the top K's weights renormalised to sum to one.

    topk_softmax(logits, top_k) -> (weights, experts)
        logits [T, E] (fp32, fp16 or bf16), returns weights [T, K] fp32 and expert ids [T, K] int64,
        what `shards.ops.reference.topk_softmax` returns.
    usable(logits, top_k) -> bool
        whether `topk_softmax` runs these arguments (Triton present, a supported dtype, E within
        MAX_EXPERTS, a CUDA device or the interpreter).

The torch path is five launches after the router's matmul (a cast, softmax, a top-k that sorts, a
sum, a division), ~13 us of a 117 us decode layer of a Mixtral-8x7B rank on an H200
(benchmarks/results/gpu-decode-profile/after-align). Here each program reads its token's E logits
once, in fp32: the top K are picked one at a time (the largest left, the lowest expert id among
equals), and their weights are exp(logit - max) over the sum of those K terms, which is the softmax's
top K renormalised (the other experts' terms cancel). Nothing waits on the host, so a decode step
stays capturable in a CUDA graph.

Legend: T tokens, E experts, K experts per token.
"""

import torch

from mixserve.shards.triton.attention import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Router logits one program holds (Mixtral has 8; a power of two pads the rest).
MAX_EXPERTS = 256


if triton is not None:

    @triton.jit
    def _topk_softmax_kernel(
        logits_ptr,  # [T, E]
        weights_ptr,  # [T, K] fp32
        experts_ptr,  # [T, K] int64
        num_experts,
        stride_t,
        TOP_K: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        es = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + token * stride_t + es, mask=es < num_experts, other=float("-inf")).to(tl.float32)
        largest = tl.max(x, axis=0)
        left = x
        picked = tl.zeros((BLOCK_E,), dtype=tl.float32)  # exp(logit - max) of the chosen, 0 elsewhere
        rank = tl.full((BLOCK_E,), -1, dtype=tl.int32)  # each chosen expert's place in the top K
        for k in tl.static_range(TOP_K):
            best = tl.max(left, axis=0)
            expert = tl.min(tl.where(left == best, es, BLOCK_E), axis=0)
            chosen = es == expert
            picked = tl.where(chosen, tl.exp(best - largest), picked)
            rank = tl.where(chosen, k, rank)
            left = tl.where(chosen, float("-inf"), left)
        total = tl.sum(picked, axis=0)
        out = token * TOP_K + rank
        tl.store(weights_ptr + out, picked / total, mask=rank >= 0)
        tl.store(experts_ptr + out, es.to(tl.int64), mask=rank >= 0)


def usable(logits: torch.Tensor, top_k: int) -> bool:
    """Whether `topk_softmax` runs for these arguments (see the module docstring)."""
    if triton is None or logits.dim() != 2 or logits.dtype not in SUPPORTED_DTYPES or logits.stride(-1) != 1:
        return False
    if not 1 <= top_k <= logits.shape[1] <= MAX_EXPERTS:
        return False
    return logits.device.type == "cuda" or interpreted()


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [T, K] (fp32, summing to one a token) and expert ids [T, K] (int64, largest first) of
    the router logits [T, E]; see the module docstring."""
    if not usable(logits, top_k):
        raise ValueError(
            f"topk_softmax: logits {logits.dtype} {tuple(logits.shape)} on {logits.device} with top_k {top_k} "
            f"are not what the kernel takes (2-D, last dimension contiguous, {top_k} <= E <= {MAX_EXPERTS})"
        )
    tokens, num_experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _topk_softmax_kernel[(tokens,)](
            logits,
            weights,
            experts,
            num_experts,
            logits.stride(0),
            TOP_K=top_k,
            BLOCK_E=triton.next_power_of_2(num_experts),
        )
    return weights, experts
