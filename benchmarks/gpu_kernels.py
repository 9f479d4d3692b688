"""`bench gpu` part (a): one decoder layer of one rank timed three ways, with bytes, roofline and peak memory.

Each case is one step (decode at a batch and context, or prefill chunks) run by today's torch path,
by the Triton kernels, and (decode only) by the Triton kernels replayed from a CUDA graph. A case
records per variant: the median time over its iterations (CUDA events on a GPU, the host clock on
the CPU), the peak memory it allocated above what was held before it, whether it ran out of
memory, and its output's error against the torch path. Bytes a decode step must read are the
layer's weights it touches (attention, norms, gate, the experts the batch's routing selects,
estimated for uniform routing) plus the KV cache it attends over; divided by the time and by the
copy bandwidth measured in the same run they give the % of the HBM roofline.

Legend: B decoding sequences, C context length, T tokens, H hidden size, E experts.
"""

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixserve.benchmarks.gpu_layer import (
    LayerWeights,
    RankShapes,
    decode_batch,
    expected_experts_hit,
    prefill_batch,
    random_pools,
    torch_layer,
    triton_layer,
)

log = logging.getLogger("mixserve.bench")

VARIANTS = ("torch", "triton", "triton_graph")


@dataclass(frozen=True, slots=True)
class Suite:
    """The cases of one run: the shapes, the decode grid and the prefill steps."""

    shapes: RankShapes
    dtype: torch.dtype
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefills: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]  # (name, ((start, length), ...))
    copy_bytes: int  # the bandwidth probe's buffer
    matmul_size: int  # the FLOP/s probe's square bf16/fp32 matmul
    iteration_budget_s: float  # timed iterations per variant: as many as fit, 3 to 20
    warmup: int  # untimed runs before them (after the one whose output is checked)
    whole_model_context: int
    whole_model_batches: tuple[int, int]  # batch 1 and the large batch the targets name (64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float, warmup: int = 2) -> tuple[float, int]:
    """Median milliseconds of fn over as many iterations as fit in budget_s (3 to 20) after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    spent, iterations = 0.0, 20
    while len(times) < iterations:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            fn()
            ms = (time.perf_counter() - began) * 1e3
        times.append(ms)
        spent += ms / 1e3
        if len(times) == 1:
            iterations = max(3, min(20, int(budget_s / max(spent, 1e-6))))
    return statistics.median(times), len(times)


def measure_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Device-to-device copy of `nbytes`: bytes read plus written over the median time, GB/s."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, budget_s=0.5)
    return {"bytes": 2 * src.numel() * 4, "ms": ms, "gb_s": 2 * src.numel() * 4 / ms / 1e6}


def measure_matmul(device: torch.device, n: int, dtype: torch.dtype) -> dict:
    """An n x n x n matmul on random data, TFLOP/s."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    ms, _ = time_ms(lambda: a @ b, device, budget_s=0.5)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflop_s": 2 * n**3 / ms / 1e9}


def capture_graph(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], torch.Tensor], bool]:
    """fn as a CUDA graph replay (warmed on a side stream first); on the CPU fn itself, eager.
    Returns (callable, whether it is a graph)."""
    if device.type != "cuda":
        return fn, False
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay, True


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.double()
    return float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30))


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error (‖out − ref‖ / ‖ref‖) at which two paths agree: fp32 arithmetic lands far
    under 1e-4; bf16/fp16 operands rounded in a different order land between 1e-3 and 1e-2."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def _memory_mark(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_gib(device: torch.device, before: int) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def run_variant(
    name: str, make: Callable[[], tuple[Callable[[], torch.Tensor], bool]], device: torch.device, suite: "Suite"
) -> tuple[dict, torch.Tensor | None]:
    """Build and time one variant; an out-of-memory or a failure is recorded, its memory freed, and the run
    goes on."""
    before = _memory_mark(device)
    budget_s, warmup = suite.iteration_budget_s, suite.warmup
    record: dict = {"oom": True, "ms": None, "iterations": 0}
    out = None
    try:
        fn, graphed = make()
        out = fn().clone()
        ms, iterations = time_ms(fn, device, budget_s, warmup)
        record = {"oom": False, "ms": ms, "iterations": iterations}
        if name == "triton_graph":
            record["graph"] = graphed
        del fn
    except torch.OutOfMemoryError:
        # Freed below, once the exception (whose frames hold the case's tensors) is gone.
        log.warning("event=oom variant=%s", name)
        out = None
    except Exception as error:  # noqa: BLE001
        # A variant that fails on this device (a kernel that does not compile, an op a graph cannot
        # capture) is one recorded error: the first GPU run must still report every other figure.
        record = {"oom": False, "ms": None, "iterations": 0, "error": f"{type(error).__name__}: {error}"[:300]}
        log.warning("event=variant_failed variant=%s error=%s", name, record["error"].splitlines()[0])
        out = None
    record["peak_gib"] = _peak_gib(device, before)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record, out


def _compare(records: dict, outputs: dict, dtype: torch.dtype) -> None:
    """Each Triton variant's relative error against the torch path, and whether it is within tolerance."""
    ref = outputs.get("torch")
    for name in VARIANTS[1:]:
        if name not in records:
            continue
        out = outputs.get(name)
        error = None if ref is None or out is None else _relative_error(out, ref)
        records[name]["rel_error"] = error
        records[name]["agrees"] = None if error is None else bool(error <= tolerance(dtype))


def layer_weight_bytes(shapes: RankShapes, element: int, experts: float) -> float:
    """Bytes of one layer's weights a step reads: attention, norms, gate and `experts` experts."""
    d = shapes.head_dim
    attention = (shapes.q_heads + 2 * shapes.kv_heads) * d * shapes.hidden + shapes.hidden * shapes.q_heads * d
    dense = attention + 2 * shapes.hidden + shapes.experts * shapes.hidden
    return element * (dense + experts * 3 * shapes.hidden * shapes.inter)


def kv_bytes(shapes: RankShapes, element: int, tokens: int) -> int:
    """Bytes of K and V for `tokens` cached tokens on this rank."""
    return 2 * element * tokens * shapes.kv_heads * shapes.head_dim


def decode_case(
    suite: Suite, weights: LayerWeights, batch: int, context: int, device: torch.device, bandwidth_gb_s: float
) -> dict:
    """One decode step at B x C, three variants, on a pool that holds exactly its blocks."""
    shapes, element = suite.shapes, suite.dtype.itemsize
    step = decode_batch(shapes, batch, context, suite.dtype, device)
    cache = random_pools(shapes, step.block_tables.numel(), suite.dtype, device)
    experts = expected_experts_hit(shapes, batch)
    nbytes = layer_weight_bytes(shapes, element, experts) + kv_bytes(shapes, element, batch * context)
    records: dict = {}
    outputs: dict = {}
    makers = {
        "torch": lambda: (lambda: torch_layer(shapes, weights, cache, step), False),
        "triton": lambda: (lambda: triton_layer(shapes, weights, cache, step), False),
        "triton_graph": lambda: capture_graph(lambda: triton_layer(shapes, weights, cache, step), device),
    }
    for name, make in makers.items():
        records[name], outputs[name] = run_variant(name, make, device, suite)
        _add_rates(records[name], nbytes, bandwidth_gb_s)
    _compare(records, outputs, suite.dtype)
    return {
        "kind": "decode",
        "name": f"decode b{batch} c{context}",
        "batch": batch,
        "context": context,
        "experts_hit": experts,
        "bytes": nbytes,
        "variants": records,
    }


def prefill_flops(shapes: RankShapes, chunks: tuple[tuple[int, int], ...]) -> float:
    """Matmul FLOPs of a prefill step: projections and two experts a token, attention over its causal context."""
    d, tokens = shapes.head_dim, sum(n for _, n in chunks)
    projections = (2 * shapes.q_heads + 2 * shapes.kv_heads) * d * shapes.hidden
    per_token = 2 * (projections + shapes.top_k * 3 * shapes.hidden * shapes.inter)
    # QK^T and PV: 4 h d FLOPs per (query, key) pair; chunk tokens see start + i + 1 keys.
    pairs = sum(n * start + n * (n + 1) / 2 for start, n in chunks)
    return tokens * per_token + 4 * shapes.q_heads * d * pairs


def prefill_case(
    suite: Suite,
    weights: LayerWeights,
    name: str,
    chunks: tuple[tuple[int, int], ...],
    device: torch.device,
    bandwidth_gb_s: float,
) -> dict:
    """One prefill step (torch and Triton; prefill is not captured in graphs)."""
    shapes, element = suite.shapes, suite.dtype.itemsize
    step = prefill_batch(shapes, list(chunks), suite.dtype, device)
    cache = random_pools(shapes, step.block_tables.numel(), suite.dtype, device)
    tokens = sum(n for _, n in chunks)
    experts = expected_experts_hit(shapes, tokens)
    nbytes = layer_weight_bytes(shapes, element, experts) + kv_bytes(shapes, element, sum(s + n for s, n in chunks))
    flops = prefill_flops(shapes, chunks)
    records: dict = {}
    outputs: dict = {}
    for variant, layer in (("torch", torch_layer), ("triton", triton_layer)):
        records[variant], outputs[variant] = run_variant(
            variant, lambda layer=layer: (lambda: layer(shapes, weights, cache, step), False), device, suite
        )
        _add_rates(records[variant], nbytes, bandwidth_gb_s)
        ms = records[variant]["ms"]
        records[variant]["tflop_s"] = None if ms is None else flops / ms / 1e9
    _compare(records, outputs, suite.dtype)
    return {
        "kind": "prefill",
        "name": name,
        "chunks": [list(c) for c in chunks],
        "tokens": tokens,
        "experts_hit": experts,
        "bytes": nbytes,
        "flops": flops,
        "variants": records,
    }


def _add_rates(record: dict, nbytes: float, bandwidth_gb_s: float) -> None:
    ms = record["ms"]
    record["gb_s"] = None if ms is None else nbytes / ms / 1e6
    record["roofline_pct"] = None if ms is None else 100 * record["gb_s"] / bandwidth_gb_s
