"""Transparent huge pages (2 MiB) for a CPU shard's weights, KV cache and large buffers; torch-free.

The C kernels' matmul loop reads four weight rows a quarter of a matrix apart and, for a prefill or a
batch, many rows of x beside them (shards/kernels/rows_times_weight_block.h): on 4 KiB pages that is a
different page for nearly every stream, on 2 MiB pages a few for a whole matrix. torch's CPU allocator
asks the kernel for huge pages (madvise MADV_HUGEPAGE on every buffer of 2 MiB and more) when
THP_MEM_ALLOC_ENABLE is set at its first allocation; the kernel grants them where
/sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise` (`never`: 4 KiB pages, as before).
On an AVX2 EPYC, fp32 weights ran the loop 1.1-1.5x faster at 33 rows of 1024 x 1024 and 3584 x 1024 in
cache (level at the demo's shapes) and were read 1.0-1.2x faster out of memory at one row; bf16 and int8
weights were about level. Served, fp32 on issue 20's 0.8B gained 1.06-1.17x at 8 streams and was level at
one; bf16 was level (benchmarks/results/huge-pages).
"""

import os
import re
from pathlib import Path

TORCH_VARIABLE = "THP_MEM_ALLOC_ENABLE"
MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def request_for_torch() -> None:
    """Have torch's CPU allocator ask for huge pages, unless the environment already says (`0` keeps
    4 KiB pages). torch reads the variable once, at its first allocation: call this before importing it."""
    os.environ.setdefault(TORCH_VARIABLE, "1")


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


def huge_page_bytes(path: Path = Path("/proc/self/smaps_rollup")) -> int | None:
    """This process's anonymous memory on huge pages (`AnonHugePages`), in bytes; None where the kernel
    does not report it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    found = re.search(r"^AnonHugePages:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None
