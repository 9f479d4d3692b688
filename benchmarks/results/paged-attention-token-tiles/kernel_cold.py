"""Two or more builds of paged_attention.c side by side, the KV out of cache: before every call a 96 MB read
(as a layer's weights pass between two layers' attention), calls alternating between the builds, 24 each;
prints the median ns a context token, build by build, per head shape (query / KV heads / head dim) and KV dtype.

`PYTHONPATH=<tree>:<tree>/proto python kernel_cold.py CTX BATCH before/paged_attention.c after/paged_attention.c`
(each source beside its element_type.h); SHAPES="8/2/128 4/1/128" and DT=f, b or fb narrow the cases."""

import ctypes
import os
import sys
import time
from pathlib import Path

import torch

from mixserve.shards.kernels import native
from mixserve.shards.kernels.paged_attention import _ARGTYPES

SHAPES = os.environ.get("SHAPES", "8/4/32 4/2/32 8/2/128 4/1/128 32/8/128 16/4/128 16/2/64 8/8/64")
DTYPES = [d for c, d in (("f", torch.float32), ("b", torch.bfloat16)) if c in os.environ.get("DT", "fb")]


def main() -> None:
    torch.set_num_threads(1)
    context, batch, sources = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    kernels = []
    for source in sources:
        fn = native.load_source(Path(source)).paged_decode_attention
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
        kernels.append(fn)
    evict = torch.ones(24 * 2**20)
    cells = []
    for shape in SHAPES.split():
        heads, kv_heads, head_dim = map(int, shape.split("/"))
        for dtype in DTYPES:
            blocks = batch * -(-context // 16)
            k = torch.randn(blocks, 16, kv_heads, head_dim).to(dtype)
            v = torch.randn(blocks, 16, kv_heads, head_dim).to(dtype)
            tables, lens = torch.randperm(blocks).reshape(batch, -1), torch.full((batch,), context)
            q = torch.randn(batch, heads, head_dim)
            out = torch.empty_like(q)
            kv_type = 1 if dtype == torch.bfloat16 else 0
            args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), kv_type, tables.data_ptr(), lens.data_ptr())
            args += (out.data_ptr(), batch, heads, kv_heads, head_dim, 16, tables.shape[1], blocks, head_dim**-0.5, 0)
            times = [[] for _ in kernels]
            for r in range(24):
                order = range(len(kernels)) if r % 2 == 0 else reversed(range(len(kernels)))
                for i in order:
                    evict.sum()
                    start = time.perf_counter()
                    kernels[i](*args)
                    times[i].append(time.perf_counter() - start)
            medians = [sorted(t)[len(t) // 2] / (context * batch) * 1e9 for t in times]
            cells.append(f"{shape}{'b' if kv_type else 'f'} " + " -> ".join(f"{m:.0f}" for m in medians))
    print(f"context {context}, batch {batch}, median ns a context token:", "  ".join(cells))


if __name__ == "__main__":
    main()
