"""The one thread a shard runs its model on.

gRPC answers every call on a pool thread of its own. Model work (warm-up, steps, releases) must
instead run one call at a time, and on a thread whose current CUDA device is the shard's: a
Triton launch or a CUDA graph capture on another thread would go to GPU 0. So every model call is
handed to one dedicated thread, made current on the shard's device when it starts, and the gRPC
thread waits for its answer; Info, Health and Interrupt stay on the gRPC threads and answer at
any time.
"""

import collections
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from mixserve.shards.devices import make_current

T = TypeVar("T")

_END, _ERROR = range(2)


class ModelThread:
    """Runs functions, one at a time, on a single thread whose current device is `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model", initializer=make_current, initargs=(device,)
        )

    def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the model thread; its result, or what it raised."""
        return self._executor.submit(fn, *args).result()

    def stream(self, produce: Callable[[threading.Event], Iterator[T]], interval_s: float = 0.0) -> Iterator[list[T]]:
        """Iterate `produce(abandoned)` on the model thread and yield its items here in lists: each list
        holds every item made since the last. `abandoned` is set once the caller stops reading early (a
        cancelled stream): `produce` should then end at its next chance, as the model thread serves no
        one else meanwhile.

        The model thread wakes this reader as an item is made unless the next item, if it comes as far
        after this one as this one came after the last, would still fall within `interval_s` of the last
        wake: such an item waits for a later wake (or the end), so the reader takes a run of fast items in
        a few lists about `interval_s` apart. Items at least half the interval apart are each handed over
        as they are made (a 9.4 ms decode step under a 10 ms interval once waited for the next one, which
        doubled a GPU stream's inter-token gaps). A wake is not free: the woken thread takes the GIL while
        the model thread runs, and on the CPUs here each wake, with the gRPC send it starts, cost the model
        thread 0.1-0.5 ms (benchmarks/RESULTS.md, stream interval). 0 wakes the reader for every item."""
        made: collections.deque = collections.deque()  # appended by the model thread, drained here
        woken = threading.Condition()
        ended: list = []  # (kind, value) once produce ends
        abandoned = threading.Event()

        def pump() -> None:
            last_wake = -math.inf
            last_item = time.perf_counter()
            try:
                for item in produce(abandoned):
                    made.append(item)
                    now = time.perf_counter()
                    gap, last_item = now - last_item, now
                    if now + gap - last_wake >= interval_s:
                        last_wake = now
                        with woken:
                            woken.notify()
            except BaseException as e:  # handed to the reader, who raises it
                outcome = (_ERROR, e)
            else:
                outcome = (_END, None)
            with woken:
                ended.append(outcome)
                woken.notify()

        self._executor.submit(pump)
        try:
            while True:
                with woken:
                    while not made and not ended:
                        woken.wait()
                    # ended is read before draining: an item made before the end is in `made` by then
                    finished = ended[0] if ended else None
                items = []
                while made:
                    items.append(made.popleft())
                if items:
                    yield items
                if finished is not None:
                    kind, value = finished
                    if kind == _ERROR:
                        raise value
                    return
        finally:
            abandoned.set()

    def close(self) -> None:
        """Let the running call finish, then end the thread."""
        self._executor.shutdown(wait=True)
