"""How many tokens a step may have for the CPU decoder layer kernel, measured at warm-up.

The kernel (kernels/decoder_layer.c over kernels/moe.c) streams each expert's weights once per group
of rows, which is what a decode step of a few tokens wants; torch's blocked GEMMs (oneDNN, MKL)
overtake it as the rows grow, at a point that depends on the model's shapes. A prefill step of one
sequence, bf16, one rank, kernel against torch (ms):

| tokens | 16 | 32 | 64 | 128 |
|---|---|---|---|---|
| demo (hidden 256, 8 experts of 512) | 2.0 / 5.0 | 3.2 / 5.8 | 5.7 / 7.6 | 11.9 / 11.1 |
| issue 20's 0.8B (hidden 1024, 8 experts of 3584) | 67 / 89 | 118 / 122 | 210 / 160 | 416 / 240 |

(bf16 widened to fp32 in the kernel). Where the CPU has bf16's dot product (rows_times_weight.h) the
kernel leads to 128 tokens on both, and at 256 the demo's is level (21.0 / 22.9) and the 0.8B's at
0.86x torch's speed (282 / 242; kept: not clearly slower), two ranks, served warm-up logs. On an
AVX2-only AMD EPYC, whose kernel build caps steps at 64 tokens where nothing was timed, the fp32 demo's
layers led to 128 tokens (37.5 / 53.4) and were level at 256 (84.0 / 87.6), and bf16's, which torch's
GEMM has no instruction for there either, led 3.4-4.4x at every size. So every model is timed up to
256 tokens (moe.TIMED_MAX_TOKENS), whatever the build's cap.

So at warm-up every rank times one prefill step of each size on `LADDER` (up to moe.TIMED_MAX_TOKENS
and the router's largest step) both ways, and the kernel keeps the sizes up to the last one where
torch is not clearly faster (`MARGIN`); the ranks agree on the smallest cap. Steps of more tokens
run torch's decoder layers, and their MoE torch's GEMMs (int8 weights: the dequantize-then-GEMM path
of shards/ops/cpu_rows.py), except where the kernel kept the top size and torch needed clearly more time
there (`choose_tiles`): then a longer step runs through the kernel in tiles of the cap, one after
another. On the AVX2 EPYC, bf16 at 256 tokens took 76 ms in the kernel against 281 in torch's layers
(two ranks), and a 256-token prefill chunk beside running decodes is such a step. int8 weights are
measured too where that path has the bf16 dot product (a bf16 model): on an Intel Xeon with AMX the
int8 kernel's own cap (256) left a 129-token int8 prefill at 305 ms in-process against 171 on the GEMM
path (benchmarks/results/compare-cpu-dtypes-0.8b-amx). fp32 int8 models, bitsandbytes weights and every
backend but the C kernels keep the caps their own paths chose.
"""

import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mixserve.shards import devices, huge_pages, ops
from mixserve.shards.cores import usable_cores
from mixserve.shards.kernels import moe, native
from mixserve.shards.kernels.checks import ELEMENT_I8
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.warmup_timings import StoredTimings, Timings, TimingsStore

LADDER = (16, 32, 64, 128, 256)
# Torch takes a size from the kernel only where it needs under this share of the kernel's time: the
# two are level within the noise of a shared machine, and a cap that moves run to run would change
# which path (and which rounding) a step of that size gets.
MARGIN = 0.8
TIMED_RUNS = 3  # per size and path, after one untimed run; the fastest counts

log = logging.getLogger(__name__)


def choose_cap(timings: Timings, kernel_cap: int) -> int:
    """The cap from (tokens, kernel seconds, torch seconds) per size, smallest first: the largest size
    before the first where torch is clearly faster, `kernel_cap` where it never is, and half the
    smallest size where it already is there."""
    cap = kernel_cap
    for index, (tokens, kernel_s, torch_s) in enumerate(timings):
        if torch_s < MARGIN * kernel_s:
            cap = timings[index - 1][0] if index else tokens // 2
            break
    return min(cap, kernel_cap)


def choose_tiles(timings: Timings, cap: int, top: int) -> bool:
    """Whether steps past the cap run in the kernel in tiles of `cap` tokens: where the ladder timed `top`
    and kept it, and torch's layers needed clearly more time there than the kernel (the kernel under MARGIN
    of torch's time); torch's GEMMs gain little from longer steps where they lack the instructions."""
    if not timings:
        return False
    size, kernel_s, torch_s = timings[-1]
    return cap == top == size and kernel_s < MARGIN * torch_s


def measure_and_cap(
    runner: ModelRunner, max_batch_tokens: int, store: TimingsStore | None = None
) -> tuple[int, Timings] | None:
    """Time the ladder on this rank's model, set the cap the ranks agree on for this process (moe.fits
    and the runner's per-token tables), log it (`event=kernel_tokens`) and return it with this rank's
    timings; None where the kernel does not run this model's decoder layers (nothing is changed then).
    Every rank must call it at the same point: the steps it times run the model's collectives, and the
    ranks decide together whether to time the next size. Runs over the allocated KV cache, which must
    hold no live sequence: every step writes block 0 and is released. With `store`, timings an earlier
    start stored for the same key are reused (`time_ladder`)."""
    if not ops.current().decoder_layers_max_tokens or not _kernel_runs(runner):
        return None
    moe.set_measured_cap(None)
    build_cap, kernel_cap = moe.max_tokens(), moe.TIMED_MAX_TOKENS
    sizes = [tokens for tokens in LADDER if tokens <= min(kernel_cap, max_batch_tokens)]
    stored = None
    if store is not None:
        weights = [half.weight_type for half in runner.model.layers[0].kernel_halves()]
        shapes = {"config": dataclasses.asdict(runner.config), "weights": weights, "block_size": runner.block_size}
        stored = store.entry("kernel_tokens", timing_key(runner, sizes, kernel_cap, shapes))
    try:
        cap, timings, reused = time_ladder(
            runner, sizes, kernel_cap, lambda tokens: _time_both(runner, tokens, kernel_cap), stored
        )
    except BaseException:
        _allow(build_cap, None)
        raise
    tiles = bool(runner.group.all_reduce_min(int(choose_tiles(timings, cap, kernel_cap))))
    _allow(cap, cap, tiles)
    rank = runner.parallel.rank
    log.info(
        "event=kernel_tokens rank=%d max_tokens=%d tiles=%s timings=%s kernel_vs_torch_ms=%s",
        rank,
        cap,
        str(tiles).lower(),
        "stored" if reused else "measured",
        shown(timings),
    )
    return cap, timings


def time_ladder(
    runner: ModelRunner,
    sizes: list[int],
    top: int,
    time_both: Callable[[int], tuple[float, float]],
    stored: StoredTimings | None = None,
) -> tuple[int, Timings, bool]:
    """The cap the ranks agree on, this rank's (size, kernel seconds, torch seconds), and whether those were
    `stored` ones: reused where every rank finds its own stored, else timed with `time_both` at each of
    `sizes`, smallest first, while every rank's kernel is not clearly slower (`top` where it never is), and
    stored. The ranks time together or not at all: the steps timed run the model's collectives."""
    kept = stored.load() if stored is not None else None
    if stored is not None and runner.group.all_reduce_min(int(kept is not None)):
        return runner.group.all_reduce_min(choose_cap(kept, top)), kept, True
    timings: Timings = []
    for size in sizes:
        timings.append((size, *time_both(size)))
        # Larger sizes only widen torch's lead: spare the warm-up their time, on every rank at once.
        if not runner.group.all_reduce_min(int(choose_cap(timings, top) >= size)):
            break
    if stored is not None:
        stored.save(timings)
    return runner.group.all_reduce_min(choose_cap(timings, top)), timings, False


def timing_key(runner: ModelRunner, sizes: list[int], top: int, shapes: dict) -> dict:
    """What this rank's timings of `sizes` (up to `top`) of a measurement on `shapes` depend on: the key
    they are stored under (shards/warmup_timings.py)."""
    return {
        "cpu": native.cpu_fingerprint(),
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "huge_pages": [huge_pages.system_mode(), huge_pages.requested()],
        "torch": torch.__version__,
        "build": native.build_identity(),
        "ops": ops.kernels_report(ops.current(), runner.dtype),
        "sources": _sources_digest(),
        "parallel": dataclasses.asdict(runner.parallel),
        "device": str(runner.device),
        "dtype": str(runner.dtype),
        "shapes": shapes,
        "sizes": sizes,
        "top": top,
    }


@functools.cache
def _sources_digest() -> str:
    """A digest of the shards' Python sources (what is timed, and how, lives there)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def shown(timings: Timings) -> str:
    """The timings as the warm-up logs them: size:kernel/torch ms, comma-separated."""
    return ",".join(f"{size}:{kernel_s * 1e3:.1f}/{torch_s * 1e3:.1f}" for size, kernel_s, torch_s in timings)


def _allow(ops_tokens: int, moe_cap: int | None, tiles: bool = False) -> None:
    ops.set_decoder_layer_tokens(ops_tokens, tiles)
    moe.set_measured_cap(moe_cap)


def _kernel_runs(runner: ModelRunner) -> bool:
    """Whether the decoder layer kernel runs this model and something else could run its steps: int8
    weights only in bf16 where torch's GEMM has the bf16 dot product (their dequantize-then-GEMM path;
    elsewhere the int8 kernels run every size)."""
    halves = runner.model.layers[0].kernel_halves()
    if halves is None or runner.draft is not None:
        return False
    return halves[1].weight_type != ELEMENT_I8 or (runner.dtype is torch.bfloat16 and devices.cpu_has_bf16())


def _time_both(runner: ModelRunner, tokens: int, kernel_cap: int) -> tuple[float, float]:
    """Seconds of the fastest prefill steps of `tokens` tokens through the decoder layer kernel (up to
    its own cap) and through torch's layers."""

    def prefill(kernel: bool) -> None:
        _allow(kernel_cap, kernel_cap if kernel else 0)
        _prefill(runner, tokens)

    return fastest_of_both(lambda: prefill(True), lambda: prefill(False))


def _prefill(runner: ModelRunner, tokens: int) -> None:
    block = runner.block_size
    table = [0] * -(-tokens // block)  # every entry block 0: the same reads and writes as a real table
    slots = [position % block for position in range(tokens)]
    token_ids = [1 + position % (runner.config.vocab_size - 1) for position in range(tokens)]
    step = SequenceStep(0, token_ids, 0, slots, table, True, SamplingParams())
    try:
        runner.step([step])
    finally:
        runner.sequences.clear()


def fastest_of_both(kernel_run: Callable[[], object], torch_run: Callable[[], object]) -> tuple[float, float]:
    """Seconds of the fastest of TIMED_RUNS runs of each path, the two alternating after an untimed run
    of each (a machine that slows down for a while slows both)."""
    best = [float("inf"), float("inf")]
    for run in range(1 + TIMED_RUNS):
        for index, path in enumerate((kernel_run, torch_run)):
            started = time.perf_counter()
            path()
            if run:
                best[index] = min(best[index], time.perf_counter() - started)
    return best[0], best[1]
