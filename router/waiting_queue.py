"""The scheduler's waiting queue, ordered by priority class and, within a class, first come first served.

A sequence's `priority` is vLLM's: lower runs earlier, 0 by default; with every priority 0 (the
`fcfs` policy, the default) the queue is a plain FIFO. A new sequence joins the back of its class and a
preempted one goes back to the front of its class, ahead of every sequence that arrived after it, so a
victim keeps its place (router/scheduler.py). Each push stamps the sequence with its order in the
queue: increasing for the back, decreasing for the front, so (priority, order) sorts the queue. Pure
Python: no torch, no I/O.
"""

import bisect
from collections.abc import Iterator

from mixserve.router.step_plan import Sequence


def queue_key(seq: Sequence) -> tuple[int, int]:
    return seq.priority, seq.queue_order


class WaitingQueue:
    """Waiting sequences, best (lowest priority value, then earliest order) first."""

    def __init__(self) -> None:
        self._queue: list[Sequence] = []
        self._back = 0  # the next back order
        self._front = 0  # the last front order

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._queue)

    @property
    def head(self) -> Sequence:
        """The sequence admitted next (IndexError when empty)."""
        return self._queue[0]

    def push_back(self, seq: Sequence) -> None:
        """A new sequence: behind every sequence of its class."""
        seq.queue_order = self._back
        self._back += 1
        self._insert(seq)

    def push_front(self, seq: Sequence) -> None:
        """A preempted sequence: ahead of every sequence of its class queued so far."""
        self._front -= 1
        seq.queue_order = self._front
        self._insert(seq)

    def pop_head(self) -> Sequence:
        return self._queue.pop(0)

    def remove(self, seq: Sequence) -> None:
        self._queue.remove(seq)

    def _insert(self, seq: Sequence) -> None:
        bisect.insort_right(self._queue, seq, key=queue_key)
