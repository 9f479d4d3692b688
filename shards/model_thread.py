"""The one thread a shard runs its model on.

gRPC answers every call on a pool thread of its own. Model work (warm-up, steps, releases) must
instead run one call at a time, and on a thread whose current CUDA device is the shard's: a
Triton launch or a CUDA graph capture on another thread would go to GPU 0. So every model call is
handed to one dedicated thread, made current on the shard's device when it starts, and the gRPC
thread waits for its answer; Info, Health and Interrupt stay on the gRPC threads and answer at
any time.
"""

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from mixserve.shards.devices import make_current

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)


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

    def stream(self, produce: Callable[[threading.Event], Iterator[T]]) -> Iterator[T]:
        """Iterate `produce(abandoned)` on the model thread and yield its items here, each as soon as
        it is made. `abandoned` is set once the caller stops reading early (a cancelled stream):
        `produce` should then end at its next chance, as the model thread serves no one else meanwhile."""
        items: queue.Queue = queue.Queue()
        abandoned = threading.Event()

        def pump() -> None:
            try:
                for item in produce(abandoned):
                    items.put((_ITEM, item))
            except BaseException as e:  # handed to the reader, who raises it
                items.put((_ERROR, e))
            else:
                items.put((_END, None))

        self._executor.submit(pump)
        try:
            while True:
                kind, value = items.get()
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise value
                yield value
        finally:
            abandoned.set()

    def close(self) -> None:
        """Let the running call finish, then end the thread."""
        self._executor.shutdown(wait=True)
