"""The shared-memory collectives' publish-wait-combine in C (shm_exchange.c), for one call per
collective instead of a dozen torch ops and a Python wait loop.

Each getter returns the ctypes function, or None where the Python path should run (the kernels not
chosen, or no compiler). Both take: the segment's seq array and slots base addresses, slot bytes,
ranks N, this rank, the call number, the data's address and size, the timeout in ns; both return
0, or -1 past the timeout.
"""

import ctypes

from mixserve.shards.kernels import native

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64]


def publish_and_wait():
    """fn(seq, slots, slot_bytes, n, rank, call, src, nbytes, timeout_ns): copy src into this rank's
    slot, publish the call, wait for every rank."""
    return native.function("shm_exchange", "shm_publish_and_wait", _ARGTYPES)


def all_reduce_f32():
    """fn(seq, slots, slot_bytes, n, rank, call, data, numel, timeout_ns): publish, wait, and sum the
    ranks' float32 slots in rank order into data."""
    return native.function("shm_exchange", "shm_all_reduce_f32", _ARGTYPES)
