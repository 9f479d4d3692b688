"""CPU cores a process may run on; torch-free, for the launcher's guess of its shards and the host check."""

import os


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
