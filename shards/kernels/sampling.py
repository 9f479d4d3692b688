"""The C per-row argmax and log-sum-exp (sampling.c) behind a torch-shaped call.

Legend: B rows, V vocabulary.
"""

import ctypes

import torch

from shards.kernels import native

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I64, _I64, _P, _P]


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
