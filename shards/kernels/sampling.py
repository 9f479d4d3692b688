"""The C per-row argmax and log-sum-exp (sampling.c), and both halves of parallel greedy, behind
torch-shaped calls.

Legend: B rows, V vocabulary.
"""

import ctypes

import torch

from shards.kernels import native

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I64, _I64, _P, _P]
_STATS_ARGTYPES = [_P, _I64, _I64, _I64, _I64, _P]
_COMBINE_ARGTYPES = [_P, _I64, _I64, _P, _P]


def _kernel():
    return native.function("sampling", "row_argmax_logsumexp", _ARGTYPES)


def row_argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(argmax [B], logsumexp [B]) of fp32 CPU logits [B, V], or None where the torch path should
    run instead: another dtype or device, the kernels not chosen, or a row holding NaN or infinity."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[1] == 0:
        return None
    fn = _kernel()
    if fn is None:
        return None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    argmax = torch.empty(rows, dtype=torch.int64)
    logsumexp = torch.empty(rows, dtype=torch.float32)
    if fn(logits.data_ptr(), rows, vocab, argmax.data_ptr(), logsumexp.data_ptr()):
        return None
    return argmax, logsumexp


def greedy_usable(logits: torch.Tensor) -> bool:
    """Whether both halves of parallel greedy run in C for this rank's slice (fp32 CPU [R, P], rows
    contiguous), under the current choice of kernels."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.shape[1] > 0
        and logits.stride(1) == 1
        and native.function("sampling", "combine_greedy", _COMBINE_ARGTYPES) is not None
    )


def slice_greedy_stats(logits: torch.Tensor, vocab_start: int) -> torch.Tensor | None:
    """[R, 3] float64 (maximum, its token id, log-sum-exp) of each row of this rank's slice [R, P]
    (`greedy_usable`), or None where a row holds NaN or infinity."""
    fn = native.function("sampling", "slice_greedy_stats", _STATS_ARGTYPES)
    rows, vocab = logits.shape
    packed = torch.empty(rows, 3, dtype=torch.float64)
    if fn(logits.data_ptr(), logits.stride(0), rows, vocab, vocab_start, packed.data_ptr()):
        return None
    return packed


def combine_greedy(every: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids [R] int64, log-probabilities [R] fp32) from every rank's numbers [R, N, 3] float64,
    or None where any is NaN or infinite."""
    fn = native.function("sampling", "combine_greedy", _COMBINE_ARGTYPES)
    every = every.contiguous()
    rows, ranks, _ = every.shape
    token_ids = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    if fn(every.data_ptr(), rows, ranks, token_ids.data_ptr(), logprobs.data_ptr()):
        return None
    return token_ids, logprobs
