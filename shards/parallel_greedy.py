"""Greedy choice over a vocabulary-parallel LM head without gathering the logits.

When every row of a step is plain greedy (no penalties, no alternatives asked for), each rank only
needs, per row, the best logit of its own vocabulary slice, where it is, and the slice's
log-sum-exp: the whole row's argmax is the best of the slices' (the lowest rank on a tie, as the
slices are in vocabulary order, so the first index as torch.argmax), and its log-sum-exp is the
log-sum-exp of the slices'. One all-gather of three numbers per row per rank replaces the gather of
[R, V] logits and the pass over them on every rank. Every rank combines the same gathered numbers in
the same order, so every rank picks the same token.

Legend: R rows that sample, P vocabulary rows per rank, N ranks.
"""

import math
import struct

import torch

from mixserve.shards import ops
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.sampling_params import SamplingParams

_FP32 = struct.Struct("f")


def is_plain_greedy(params: SamplingParams) -> bool:
    """True when the token is the argmax of the raw logits and only its log-probability is reported."""
    return (
        params.greedy
        and not params.has_repetition_penalty
        and not params.has_output_penalty
        and params.top_n_tokens == 0
    )


def slice_stats(local: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """[R, 3] float64 (maximum, its token id, log-sum-exp) of each row of this rank's logits [R, P] over
    its real tokens' columns (not finite where a row holds NaN or infinity, or no real token)."""
    valid = max(min(local.shape[1], vocab_size - vocab_start), 0)
    return ops.current().slice_greedy_stats(local[:, :valid].float(), vocab_start)  # [R, 3]


def greedy_choice(packed: torch.Tensor, group: TensorParallelGroup) -> tuple[list[int], list[float]] | None:
    """Each row's token id and log-probability (an fp32 value) from this rank's statistics [R, 3]
    (`slice_stats` of its logits, whose column j is token vocab_start + j, or the model's forward with
    greedy_stats), as combine_stats gives them.

    A collective: every rank must call it for the same rows. Returns None on every rank together when
    any rank's slice holds NaN or infinity (or is all padding, with more ranks than vocabulary rows);
    the caller then gathers the logits and samples as usual. On one rank the statistics are read off
    as they are: the only rank wins every row, and the log-probability is its maximum less its
    log-sum-exp, rounded to fp32, as combine_greedy computes it for one rank. One .tolist() in place of
    the collective's, the C call's and two outputs' torch ops, each the first after the LM head streamed
    through the cache (~30 us of a demo decode step)."""
    if group.world_size > 1:
        chosen = combine_stats(packed, group)
        return None if chosen is None else (chosen[0].tolist(), chosen[1].tolist())
    rows = packed.tolist()
    if not all(math.isfinite(value) for row in rows for value in row):
        return None
    return [int(row[1]) for row in rows], [_FP32.unpack(_FP32.pack(row[0] - row[2]))[0] for row in rows]


def combine_stats(packed: torch.Tensor, group: TensorParallelGroup) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids [R] int64, log-probabilities [R] fp32) from this rank's statistics [R, 3], every rank's
    gathered and combined (ops' combine_greedy); None where any is not finite. A collective."""
    every = group.all_gather_last_dim(packed).view(packed.shape[0], -1, 3)  # [R, N, 3]
    return ops.current().combine_greedy(every)
