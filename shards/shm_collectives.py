"""All-reduce and all-gather through shared memory, for the CPU shards of one host.

gloo's TCP collectives cost ~7-9 ms a call with 4 processes on 2 cores, whatever the size; a
decode step makes ten of them. Here every rank owns a slot in one shared segment: a collective
copies the local tensor into the rank's slot, bumps the rank's sequence number, waits (yielding the
core, never blocking in a syscall that sleeps) until every rank has published the same call, and
reads every slot. Slots are double-buffered by call parity: a rank may overwrite its slot for call
k+2 only after every rank has published call k+1, which it does after reading call k, so one
barrier per call is enough. Each rank sums the slots in rank order, so every rank gets bit-identical
results, as the model's identical-sampling contract needs. Where the C kernels are chosen a
collective is one call into shm_exchange.c (same protocol, same order of the sum), else torch ops.

Legend: N ranks, S slot bytes.
"""

import os
import time
from multiprocessing import resource_tracker, shared_memory

import torch

from mixserve.shards.kernels import shm_exchange

# Past this size (per rank per call) the copy costs more than gloo's fixed overhead saves.
DEFAULT_SLOT_BYTES = 8 << 20
_HEADER_BYTES = 4096  # one int64 sequence number per rank, padded to a page


class SharedMemoryGroup:
    """One host's ranks joined through a named shared-memory segment."""

    def __init__(self, name: str, rank: int, world_size: int, slot_bytes: int = DEFAULT_SLOT_BYTES, create=False):
        self.rank = rank
        self.world_size = world_size
        self.slot_bytes = slot_bytes
        self.timeout_s = 600.0
        size = _HEADER_BYTES + 2 * world_size * slot_bytes
        if create:
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            self._shm.buf[:_HEADER_BYTES] = bytes(_HEADER_BYTES)
        else:
            self._shm = _attach(name)
        self._owner = create
        raw = torch.frombuffer(self._shm.buf, dtype=torch.uint8)
        self._seq = raw[: 8 * world_size].view(torch.int64)  # [N] calls published per rank
        self._slots = raw[_HEADER_BYTES:].view(2, world_size, slot_bytes)  # [parity, N, S]
        self._calls = 0
        self._pointers = (self._seq.data_ptr(), self._slots.data_ptr(), slot_bytes, world_size, rank)

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cpu and tensor.numel() * tensor.element_size() <= self.slot_bytes

    def _exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """Publish `tensor`, wait for every rank's, and return all of them as [N, *shape] views."""
        call = self._next_call()
        nbytes = tensor.numel() * tensor.element_size()
        slots = self._slots[call % 2]
        tensor = tensor.contiguous()
        fn = shm_exchange.publish_and_wait()
        if fn is not None:
            if fn(*self._pointers, call, tensor.data_ptr(), nbytes, self.timeout_ns()):
                raise self.timed_out(call)
        else:
            slots[self.rank, :nbytes].copy_(tensor.view(-1).view(torch.uint8))
            self._seq[self.rank] = call
            self._wait_for(call)
        return slots[:, :nbytes].view(tensor.dtype).view(self.world_size, *tensor.shape)

    def _wait_for(self, call: int) -> None:
        seq = self._seq
        started = None
        while int(seq.min()) < call:
            # Yield rather than spin: the shards may share fewer cores than there are ranks.
            os.sched_yield()
            if started is None:
                started = time.monotonic()
            elif time.monotonic() - started > self.timeout_s:
                raise self.timed_out(call)

    @property
    def pointers(self) -> tuple[int, int, int, int, int]:
        """(seq, slots, slot_bytes, ranks, rank): what shm_exchange.c's calls take before the call number."""
        return self._pointers

    def reserve_calls(self, count: int) -> int:
        """The first of `count` consecutive call numbers, for a caller that makes those collectives itself in
        C (shm_exchange.c's, e.g. inside decoder_layer.c's decoder_stack)."""
        first = self._calls + 1
        self._calls += count
        return first

    def _next_call(self) -> int:
        return self.reserve_calls(1)

    def timeout_ns(self) -> int:
        """How long a collective waits for the other ranks, in ns."""
        return int(self.timeout_s * 1e9)

    def timed_out(self, call: int) -> TimeoutError:
        """The error of a collective whose ranks never all reached `call`."""
        return TimeoutError(f"rank {self.rank}: ranks {self._seq.tolist()} never reached call {call}")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks into `tensor` (in place), identically on every rank: rank 0's part plus
        rank 1's, plus rank 2's, and so on."""
        fn = shm_exchange.all_reduce_f32() if tensor.dtype == torch.float32 and tensor.is_contiguous() else None
        if fn is not None:
            call = self._next_call()
            if fn(*self._pointers, call, tensor.data_ptr(), tensor.numel(), self.timeout_ns()):
                raise self.timed_out(call)
            return tensor
        parts = self._exchange(tensor)
        tensor.copy_(parts[0])
        for part in parts[1:]:
            tensor.add_(part)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        return torch.cat(parts.unbind(0), dim=-1)

    def unlink(self) -> None:
        """Remove the segment's name once every rank has attached; the mappings stay valid, and
        nothing is left behind in /dev/shm even if a rank is killed later."""
        if self._owner:
            self._shm.unlink()
            self._owner = False


def _attach(name: str) -> shared_memory.SharedMemory:
    """Another rank's segment, not registered with this process's resource tracker: the creator owns it.

    Python before 3.13 registers every attach, and unregistering afterwards is wrong where the ranks were
    spawned from one parent: they share its tracker, so that would drop the creator's registration too (its
    unlink then makes the tracker print a KeyError, and a crashed creator's segment would not be removed).
    """
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python 3.13 and later
    except TypeError:
        pass
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register
