"""The roofline's read bandwidth: the fastest of a tensor sum (one stream) and benchmarks/read_streams.c
(4 or 8 in-order streams side by side, the access the C kernels' matmul loop makes), on one thread or on
several at once, each reading its share. Without a C compiler, the sum alone."""

import ctypes
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger("mixserve.bench")

STREAMS = (4, 8)
_library: list = []


def _read_streams():
    """read_streams from the C file beside this one, or None where it cannot be built."""
    if not _library:
        from mixserve.shards.kernels.native import KernelUnavailable, load_source

        try:
            function = load_source(Path(__file__).with_name("read_streams.c")).read_streams
            function.restype = ctypes.c_double
            function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        except KernelUnavailable as e:
            log.warning("event=read_streams_unavailable reason=%s: the roofline reads with torch's sum alone", e)
            function = None
        _library.append(function)
    return _library[0]


def _timed_together(parts: list, read) -> float:
    """Seconds from the start of `read` on every part at once (a thread each) to the last one's end."""
    if len(parts) == 1:
        started = time.perf_counter()
        read(parts[0])
        return time.perf_counter() - started
    ready = threading.Barrier(len(parts) + 1)
    threads = [threading.Thread(target=lambda part=part: (ready.wait(), read(part))) for part in parts]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def read_methods() -> dict:
    """The ways to read a contiguous fp32 tensor (its share on each thread): name -> function of the part."""
    methods = {"sum": lambda part: part.sum()}
    function = _read_streams()
    if function is not None:
        for streams in STREAMS:
            methods[f"{streams} streams"] = lambda part, s=streams: function(part.data_ptr(), part.numel(), s)
    return methods


def read_once(buffer, method: str, threads: int = 1) -> float:
    """Seconds `threads` threads take to read `buffer`, each its share, by one of read_methods (ctypes lets
    go of the GIL; torch's sum runs on `threads` threads of its own)."""
    import torch

    read = read_methods()[method]
    with torch.inference_mode():
        if method == "sum":
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return _timed_together([buffer], read)
            finally:
                torch.set_num_threads(previous)
        return _timed_together(list(buffer.chunk(threads)), read)


def read_seconds(buffer, threads: int = 1) -> float:
    """Seconds of the fastest of one read of `buffer` by each of read_methods."""
    return min(read_once(buffer, method, threads) for method in read_methods())
