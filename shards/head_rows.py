"""How many rows of logits a step may ask of the C kernel's LM head, measured at warm-up.

The kernel (kernels/linear.c) streams the head's weight once per group of four of its rows, which is
what a decode step of a few sequences wants; torch's blocked GEMM overtakes it as the rows grow, at a
point that depends on the CPU and the dtype. On an Intel Xeon (fp32, MKL) that was from 32 rows, hence
the build's cap of 16 (linear.MAX_ROWS). On an AVX2-only AMD EPYC the kernel led at every size to 64, one
thread, the demo's head (8192 x 256), kernel against torch (ms):

| rows | 16 | 32 | 64 |
|---|---|---|---|
| fp32 | 3.6 / 5.1 | 6.1 / 8.1 | 11.5 / 12.9 |
| bf16 | 3.8 / 15.6 | 7.5 / 31.1 | 14.7 / 62.2 |

(torch's bf16 GEMM has no instruction to use there). A step past the cap also leaves the one C call
of a decode step (the decoder stack with the model's ends) for the separate ops.

So at warm-up every rank times its head on `LADDER` rows (up to the router's largest batch) through the
kernel and through torch, the two alternating, and the kernel keeps the rows up to the last size where
torch is not clearly faster (kernel_tokens.MARGIN); the ranks agree on the smallest cap, which is never
below linear.MAX_ROWS. int8 heads keep their own rule (ops/cpu_rows.py `int8_gemm`).
"""

import logging

import torch

from mixserve.shards.kernel_tokens import fastest_of_both, shown, time_ladder, timing_key
from mixserve.shards.kernels import linear
from mixserve.shards.ops import reference
from mixserve.shards.runner import ModelRunner
from mixserve.shards.warmup_timings import Timings, TimingsStore

LADDER = (32, 64, 128)

log = logging.getLogger(__name__)


def measure_head_rows(
    runner: ModelRunner, max_batch_size: int, store: TimingsStore | None = None
) -> tuple[int, Timings] | None:
    """Time the LM head on the ladder, set the row cap the ranks agree on for this process (linear.max_rows),
    log it (`event=head_rows`) and return it with this rank's timings; None where the C kernel does not
    run this head (nothing is changed then). Every rank must call it at the same point: the ranks decide
    together whether to time the next size. With `store`, timings an earlier start stored for the same
    key are reused (kernel_tokens.time_ladder)."""
    ends = runner.model.kernel_ends()
    linear.set_measured_rows(None)
    if ends is None or not isinstance(ends.head, torch.Tensor) or not linear.available():
        return None
    head, hidden = ends.head, ends.hidden_size
    top = max(size for size in LADDER if size <= max(max_batch_size, LADDER[0]))
    sizes = [size for size in LADDER if size <= top]
    generator = torch.Generator().manual_seed(0)

    def time_both(rows: int) -> tuple[float, float]:
        x = torch.randn(rows, hidden, generator=generator).to(ends.dtype)  # [R, H]
        return fastest_of_both(lambda: _kernel(x, head), lambda: reference.linear_rows(x, head))

    stored = None
    if store is not None:
        shapes = {"head": list(head.shape), "head_dtype": str(head.dtype), "activations": str(ends.dtype)}
        stored = store.entry("head_rows", timing_key(runner, sizes, top, shapes))
    cap, timings, reused = time_ladder(runner, sizes, top, time_both, stored)
    linear.set_measured_rows(cap)
    log.info(
        "event=head_rows rank=%d max_rows=%d timings=%s kernel_vs_torch_ms=%s",
        runner.parallel.rank,
        cap,
        "stored" if reused else "measured",
        shown(timings),
    )
    return cap, timings


def _kernel(x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """The head's product as ops/cpu.py's linear_rows runs it in the kernel."""
    return linear.linear_rows(x.float().contiguous(), head).to(x.dtype)
