"""Whether a CPU shard's large buffers sit on transparent huge pages (2 MiB), as its start-up line and the
warm-up timings' key say; torch-free.

torch's CPU allocator asks the kernel for huge pages (madvise MADV_HUGEPAGE on every buffer of 2 MiB and
more: the weights, the KV cache, large activations) when THP_MEM_ALLOC_ENABLE=1 is in the environment at
its first allocation; the kernel grants them where /sys/kernel/mm/transparent_hugepage/enabled is
`always` or `madvise`. The C kernels' matmul loop reads four weight rows a quarter of a matrix apart and,
in a batch, many rows of x beside them: on 4 KiB pages a different page for nearly every stream. On an
AVX2 EPYC (a VM) fp32 weights ran the loop 1.1-1.5x faster at 33 rows of 1024 x 1024 and 3584 x 1024 in
cache and served 1.06-1.17x at 8 streams on issue 20's 0.8B; bf16 and int8 were level. First touching a
huge page cost more there (a GiB zeroed in 0.6-2.2 s against 0.35-0.41), so a demo start took 7.7-8.1
s against 4.5-5.2: an operator's choice, not the default (benchmarks/results/huge-pages).
"""

import os
import re
from pathlib import Path

TORCH_VARIABLE = "THP_MEM_ALLOC_ENABLE"
MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")


def requested() -> bool:
    """Whether this process's torch asks for huge pages (the variable as torch reads it: an integer, 0 off)."""
    try:
        return int(os.environ.get(TORCH_VARIABLE, "0")) != 0
    except ValueError:
        return False


def system_mode(path: Path = MODE_FILE) -> str:
    """The kernel's huge page mode (`always`, `madvise` or `never`: the bracketed word of the file), or
    `unknown` where the file is missing or says none."""
    try:
        chosen = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return "unknown"
    return chosen.group(1) if chosen else "unknown"


def huge_page_bytes(path: Path = SMAPS_ROLLUP) -> int | None:
    """A process's anonymous memory on huge pages (`AnonHugePages` of its smaps_rollup: this one's by
    default), in bytes; None where the kernel does not report it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    found = re.search(r"^AnonHugePages:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None
