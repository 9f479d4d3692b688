"""The C per-row argmax and log-sum-exp (sampling.c), both halves of parallel greedy, a grammar's
bitmasks applied to logits, and sampled rows' cuts and draw, behind checked, torch-shaped calls (fp32 /
float64 / int CPU tensors).

Legend: B rows, V vocabulary, R rows of a rank's slice, P its columns, N ranks, C constrained rows,
W 32-bit words of a bitmask row.
"""

import ctypes

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.checks import require
from mixserve.shards.kernels.native import KernelUnavailable

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I64, _I64, _P, _P]
_STATS_ARGTYPES = [_P, _I64, _I64, _I64, _I64, _P]
_COMBINE_ARGTYPES = [_P, _I64, _I64, _P, _P]
_MASK_ARGTYPES = [_P, _I64, _I64, _P, _I64, _P, _I64, _I64, _I64, ctypes.c_float]
_DRAW_ARGTYPES = [_P, _I64, _I64, _P, _P]


def _function(name: str, argtypes: list):
    fn = native.function("sampling", name, argtypes)
    if fn is None:
        raise KernelUnavailable(f"the {name} kernel is not available")
    return fn


def available() -> bool:
    """Whether the kernels run under the current choice of kernels."""
    return native.function("sampling", "row_argmax_logsumexp", _ARGTYPES) is not None


def _nonempty_rows(logits: torch.Tensor, name: str, contiguous: bool) -> tuple[int, int]:
    rows, vocab = require(logits, name, torch.float32, 2, contiguous)
    if vocab == 0:
        raise ValueError(f"{name} must have at least one column")
    if logits.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous rows, got strides {logits.stride()}")
    return rows, vocab


def row_argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(argmax [B] int64, logsumexp [B] fp32) of fp32 logits [B, V] (contiguous), or None where a row
    holds NaN or infinity."""
    fn = _function("row_argmax_logsumexp", _ARGTYPES)
    rows, vocab = _nonempty_rows(logits, "logits", contiguous=True)
    argmax = torch.empty(rows, dtype=torch.int64)
    logsumexp = torch.empty(rows, dtype=torch.float32)
    if fn(logits.data_ptr(), rows, vocab, argmax.data_ptr(), logsumexp.data_ptr()):
        return None
    return argmax, logsumexp


def slice_greedy_stats(logits: torch.Tensor, vocab_start: int) -> torch.Tensor | None:
    """[R, 3] float64 (maximum, its token id, log-sum-exp) of each row of this rank's fp32 slice
    [R, P] (rows contiguous, any stride apart), or None where a row holds NaN or infinity."""
    fn = _function("slice_greedy_stats", _STATS_ARGTYPES)
    rows, vocab = _nonempty_rows(logits, "logits", contiguous=False)
    packed = torch.empty(rows, 3, dtype=torch.float64)
    if fn(logits.data_ptr(), logits.stride(0), rows, vocab, vocab_start, packed.data_ptr()):
        return None
    return packed


def combine_greedy(every: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids [R] int64, log-probabilities [R] fp32) from every rank's numbers [R, N, 3] float64
    (contiguous), or None where any is NaN or infinite."""
    fn = _function("combine_greedy", _COMBINE_ARGTYPES)
    rows, ranks, three = require(every, "every", torch.float64, 3)
    if three != 3:
        raise ValueError(f"every must be [R, N, 3], got {tuple(every.shape)}")
    token_ids = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    if fn(every.data_ptr(), rows, ranks, token_ids.data_ptr(), logprobs.data_ptr()):
        return None
    return token_ids, logprobs


def apply_token_bitmask(
    logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, vocab_start: int, vocab_size: int, masked: float
) -> None:
    """Set to `masked`, in place, the tokens the grammar masks disallow: in each row `rows[c]` of fp32
    logits [R, P] (rows contiguous, any stride apart; column j is token `vocab_start + j`), every column
    whose token's bit is clear in `bitmask[c]` ([C, W] int32) or is at or past `vocab_size`."""
    fn = _function("apply_token_bitmask", _MASK_ARGTYPES)
    num_rows, width = _nonempty_rows(logits, "logits", contiguous=False)
    mask_rows, words = require(bitmask, "bitmask", torch.int32, 2)
    if mask_rows != len(rows):
        raise ValueError(f"bitmask has {mask_rows} rows for {len(rows)} constrained rows")
    if not all(0 <= row < num_rows for row in rows):
        raise ValueError(f"rows must index the {num_rows} rows of logits, got {rows}")
    if not 0 <= vocab_start or not 0 < vocab_size <= 32 * words:
        raise ValueError(f"vocab_start {vocab_start} / vocab_size {vocab_size} do not fit {words}-word masks")
    at = torch.tensor(rows, dtype=torch.int64)  # [C]
    fn(
        logits.data_ptr(),
        logits.stride(0),
        width,
        at.data_ptr(),
        len(rows),
        bitmask.data_ptr(),
        words,
        vocab_start,
        vocab_size,
        masked,
    )


def draw_tokens(
    logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float], uniforms: list[float]
) -> torch.Tensor | None:
    """One token per row of fp32 logits [R, V] (contiguous), [R] int64: shards/draw.py's draw_tokens
    (temperature > 0, then top-k, top-p, and the inverse transform with each row's uniform in [0, 1)), or
    None where a row holds NaN or infinity."""
    fn = _function("draw_tokens", _DRAW_ARGTYPES)
    rows, vocab = _nonempty_rows(logits, "logits", contiguous=True)
    if not len(temperature) == len(top_k) == len(top_p) == len(uniforms) == rows:
        raise ValueError(f"need one temperature, top_k, top_p and uniform per row of {rows}")
    if min(temperature, default=1.0) <= 0 or min(top_p, default=1.0) <= 0 or min(top_k, default=0) < 0:
        raise ValueError("temperatures and top_p must be > 0, top_k >= 0")
    settings = torch.tensor([temperature, top_k, top_p, uniforms], dtype=torch.float64)  # [4, R]
    tokens = torch.empty(rows, dtype=torch.int64)
    status = fn(logits.data_ptr(), rows, vocab, settings.data_ptr(), tokens.data_ptr())
    if status == 2:
        raise MemoryError(f"draw_tokens: no scratch memory for a row of {vocab}")
    return None if status else tokens
