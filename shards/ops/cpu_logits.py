"""The CPU backend's ops over logits (shards/ops/cpu.py's, for the LM head's output): the greedy statistics,
a grammar's masks and the sampled rows' draw in the C kernels (shards/kernels/sampling.c), for fp32 logits
(sampling widens them to fp32 in every dtype) holding no NaN or infinity; else the torch reference.

Legend: R rows, V vocabulary, C constrained rows, W mask words a row.
"""

import torch

from mixserve.shards.kernels import sampling
from mixserve.shards.ops import reference


def _fp32_cpu(x: torch.Tensor) -> bool:
    return x.dtype is torch.float32 and x.is_cpu


def row_argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.row_argmax_logsumexp, in the C kernel for fp32 rows holding no NaN or infinity."""
    if logits.dim() == 2 and logits.shape[1] and _fp32_cpu(logits):
        stats = sampling.row_argmax_logsumexp(logits.contiguous())
        if stats is not None:
            return stats
    return reference.row_argmax_logsumexp(logits)


def slice_greedy_stats(logits: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """reference.slice_greedy_stats, in the C kernel for an fp32 slice with contiguous rows holding no
    NaN or infinity."""
    if logits.dim() == 2 and logits.shape[1] and _fp32_cpu(logits) and logits.stride(1) == 1:
        packed = sampling.slice_greedy_stats(logits, vocab_start)
        if packed is not None:
            return packed
    return reference.slice_greedy_stats(logits, vocab_start)


def combine_greedy(every: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """reference.combine_greedy, in the C kernel for float64 numbers on the CPU."""
    if every.dtype is not torch.float64 or not every.is_cpu:
        return reference.combine_greedy(every)
    return sampling.combine_greedy(every.contiguous())


def apply_token_bitmask(
    logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, vocab_start: int, vocab_size: int
) -> torch.Tensor:
    """reference.apply_token_bitmask, in the C kernel for fp32 logits and int32 masks on the CPU: a copy of
    the logits with the disallowed tokens set to MASKED_LOGIT."""
    if not (_fp32_cpu(logits) and logits.dim() == 2 and logits.shape[1] and bitmask.is_cpu):
        return reference.apply_token_bitmask(logits, rows, bitmask, vocab_start, vocab_size)
    masked = logits.clone(memory_format=torch.contiguous_format)
    sampling.apply_token_bitmask(
        masked, rows, bitmask.to(torch.int32).contiguous(), vocab_start, vocab_size, reference.MASKED_LOGIT
    )
    return masked


def draw_tokens(
    logits: torch.Tensor,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    typical_p: list[float],
    min_p: list[float],
    uniforms: list[float],
) -> torch.Tensor:
    """reference.draw_tokens, in the C kernel for fp32 rows holding no NaN or infinity and asking no typical or
    min-p cut."""
    cuts_in_c = min(typical_p, default=1.0) >= 1 and max(min_p, default=0.0) <= 0
    if logits.dim() == 2 and logits.shape[1] and _fp32_cpu(logits) and cuts_in_c:
        tokens = sampling.draw_tokens(logits.contiguous(), temperature, top_k, top_p, uniforms)
        if tokens is not None:
            return tokens
    return reference.draw_tokens(logits, temperature, top_k, top_p, typical_p, min_p, uniforms)
