"""KV cache sizing from the worst-case steps the router may send.

The cache gets what is left after the weights, the peak of the largest steps (measured by running
them) and a safety margin: budget = free - peak_activations - headroom, blocks = budget // block
bytes. The worst cases are the largest decode batch with every block table as wide as the longest
context (the torch decode path pads every row to the widest), and a full prefill chunk at the last
start position beside the other decodes.

The warm-up runs those steps over a cache of a few blocks: each table's leading entries all point at
block 0, and only the blocks a step writes are its own. Attention reads a block whatever it holds,
so this costs the same time and temporaries as a real cache holding B x context tokens, which (at
batch 256 and context 32k) would not even fit the device.

On CUDA the peak comes from the caching allocator's statistics; elsewhere from `LiveBytes`, which
counts the storages the step creates (on the meta device too, so the sizing can be checked at a
large model's real shapes without its memory). On CPU the budget is a share of MemAvailable (the
shards of a host share it) and the activations come from the rest, so the peak would size nothing:
a CPU shard does not run the worst-case steps (on a 2-shard demo start they were ~3-5 s of a 5-7.6 s
warm-up: benchmarks/results/cpu-start-warmup), and its report's peak is 0, "not measured".
`measure_worst_case` still measures a CPU model where called.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

# Kept free on CUDA besides the measured peak: allocator fragmentation, cuBLAS and NCCL workspaces
# that grow after the warm-up. A share of the device's total memory (4 GB of an 80 GB A100).
CUDA_HEADROOM_FRACTION = 0.05


class InsufficientMemory(RuntimeError):
    """The worst-case step leaves no room for a KV cache (gRPC RESOURCE_EXHAUSTED at Warmup)."""


@dataclass(slots=True, frozen=True)
class StepLimits:
    """The largest step the router may send: tokens, sequences, and the longest context one reaches."""

    max_batch_tokens: int
    max_batch_size: int
    max_context: int

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def clamped(cls, max_batch_tokens: int, max_batch_size: int, max_context: int, max_positions: int) -> "StepLimits":
        """The limits a Warmup request asks for, bounded by the model (0 context: max_positions)."""
        context = min(max_context or max_positions, max_positions)
        tokens = max(1, max_batch_tokens)
        return cls(tokens, max(1, min(max_batch_size, tokens)), max(1, context))

    @property
    def max_prefill_chunk(self) -> int:
        """Prompt tokens of the largest chunk: the step's tokens less one per other sequence."""
        return max(1, min(self.max_batch_tokens - (self.max_batch_size - 1), self.max_context))


@dataclass(slots=True, frozen=True)
class MemoryReport:
    """How the KV cache was sized on one shard (bytes; free_bytes is what was free when sizing)."""

    weight_bytes: int
    kv_cache_bytes: int
    block_bytes: int
    peak_activation_bytes: int
    headroom_bytes: int
    free_bytes: int
    num_blocks: int
    limits: StepLimits


def warmup_blocks(limits: StepLimits, block_size: int) -> int:
    """Blocks the worst-case steps write: one per decode, the prefill chunk's own, and the shared block 0."""
    chunk_blocks = -(-limits.max_prefill_chunk // block_size) + 1  # a chunk may straddle one more block
    return 1 + limits.max_batch_size + chunk_blocks


def worst_case_steps(limits: StepLimits, block_size: int, vocab_size: int) -> list[list[SequenceStep]]:
    """The steps to measure: B decodes at the longest context, and B - 1 of them beside a full
    prefill chunk that ends there. Table entries a step does not write point at block 0."""
    greedy = SamplingParams(temperature=0.0)
    context = limits.max_context
    width = -(-context // block_size)

    def sequence(seq_id: int, num_tokens: int, first_own_block: int) -> SequenceStep:
        start = context - num_tokens
        table = [0] * width
        own = range(start // block_size, width)
        for i, index in enumerate(own):
            table[index] = first_own_block + i
        slots = [table[p // block_size] * block_size + p % block_size for p in range(start, context)]
        tokens = [(seq_id * 131 + p * 7) % vocab_size for p in range(num_tokens)]
        return SequenceStep(seq_id, tokens, start, slots, table, True, greedy)

    decodes = [sequence(i, 1, 1 + i) for i in range(limits.max_batch_size)]
    chunk = sequence(limits.max_batch_size - 1, limits.max_prefill_chunk, limits.max_batch_size)
    return [decodes, decodes[:-1] + [chunk]]


def plan_blocks(free_bytes: int, peak_activation_bytes: int, headroom_bytes: int, block_bytes: int) -> int:
    """KV blocks that fit beside the peak and the headroom (0 when none do)."""
    return max(0, (free_bytes - peak_activation_bytes - headroom_bytes) // block_bytes)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages the ops run inside the mode create that are still alive, and their peak.

    Meta tensors carry no values, so a bincount over one (the MoE's tokens per expert) answers with
    every pair on the first expert: the largest per-expert batch, an upper bound on any routing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}  # storage key -> (weak ref, bytes)

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing compiles inside this mode; torch would otherwise wrap __torch_dispatch__ to disable
        # dynamo, importing torch._dynamo (~2.5 s of a CPU shard's start) at the mode's first op.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.bincount.default and args[0].is_meta:
            counts = [0] * max(kwargs.get("minlength", 0), 1)
            counts[0] = args[0].numel()
            return torch.tensor(counts)
        on_meta = any(isinstance(a, torch.Tensor) and a.is_meta for a in args)
        if on_meta and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Under inference mode composite ops (SDPA) reach the mode whole: on meta, run their
            # decomposition inside it, so that its temporaries (SDPA's math fallback, which CUDA takes
            # for a masked GQA call) are counted. On a real device the op's own kernel runs.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        self._forget_freed()
        returns = func._schema.returns
        values = out if len(returns) > 1 else (out,)
        for value, returned in zip(values, returns, strict=True):
            # A return that aliases an input (a view, an in-place op) allocates nothing.
            if returned.alias_info is not None:
                continue
            for tensor in value if isinstance(value, list | tuple) else (value,):
                if isinstance(tensor, torch.Tensor):
                    self._track(tensor.untyped_storage())
        return out

    def _forget_freed(self) -> None:
        freed = [key for key, (ref, _) in self._storages.items() if ref.expired()]
        for key in freed:
            self.live -= self._storages.pop(key)[1]

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key not in self._storages:
            self._storages[key] = (StorageWeakRef(storage), storage.nbytes())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)


def measure_peak(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes `run` allocates beyond what was allocated before it (its temporaries and outputs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes() as meter:
        run()
    return meter.peak


def measure_worst_case(
    runner: ModelRunner, limits: StepLimits, run_step: Callable[[list[SequenceStep]], object]
) -> int:
    """Allocate a warm-up cache, run each worst-case step through `run_step`, return the largest peak."""
    runner.allocate_cache(warmup_blocks(limits, runner.block_size))
    peak = 0
    for steps in worst_case_steps(limits, runner.block_size, runner.config.vocab_size):
        peak = max(peak, measure_peak(lambda steps=steps: run_step(steps), runner.device))
        runner.sequences.clear()
    return peak


def size_kv_cache(
    runner: ModelRunner, limits: StepLimits, weight_bytes: int, max_blocks: int, cpu_budget_bytes: int
) -> MemoryReport:
    """Measure the worst-case steps (not on CPU, whose budget they would not change), then give the KV
    cache what is left; every rank ends with the same block count (the minimum over the group). Raises
    InsufficientMemory where none is left."""
    device = runner.device
    peak = 0
    if device.type != "cpu":
        try:
            peak = measure_worst_case(runner, limits, runner.step)
        except torch.cuda.OutOfMemoryError as e:
            raise InsufficientMemory(
                f"the worst-case step (batch {limits.max_batch_size} at context {limits.max_context}, "
                f"{limits.max_batch_tokens} tokens) ran out of device memory beside {_gib(weight_bytes)} of "
                "weights: lower --max-batch-size, --max-batch-prefill-tokens or --max-total-tokens, or add shards"
            ) from e
    runner.kv_cache = None  # the warm-up cache, or an earlier Warmup's, freed before the new one
    gc.collect()
    block_bytes = runner.bytes_per_block()
    # Decode graphs keep one block past the router's as their padding rows' scratch.
    reserved = 1 if runner.graphs_wanted else 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        headroom = int(total * CUDA_HEADROOM_FRACTION)
        if runner.graphs_wanted:
            # The graphs' shared memory pool stays allocated after capture; it holds at most one decode
            # step's activations, which the worst case measured bounds.
            headroom += peak
        num_blocks = plan_blocks(free, peak, headroom, block_bytes) - reserved
    else:
        free, headroom = cpu_budget_bytes, 0
        num_blocks = plan_blocks(cpu_budget_bytes, 0, 0, block_bytes) - reserved
    if max_blocks:
        num_blocks = min(num_blocks, max_blocks)
    num_blocks = runner.group.all_reduce_min(num_blocks)
    if num_blocks < 1 and device.type == "cpu":
        raise InsufficientMemory(
            f"no room for a KV cache: this shard's KV budget ({cpu_budget_bytes} bytes, a share of MemAvailable) "
            f"holds no block of {block_bytes} bytes: free memory, lower --block-size, or add shards"
        )
    if num_blocks < 1:
        raise InsufficientMemory(
            f"no room for a KV cache: {_gib(free)} free after {_gib(weight_bytes)} of weights, the worst-case step "
            f"(batch {limits.max_batch_size} at context {limits.max_context}) needs {_gib(peak)} and "
            f"{_gib(headroom)} is kept as headroom: lower --max-batch-size, --max-batch-prefill-tokens or "
            "--max-total-tokens, or add shards"
        )
    runner.allocate_cache(num_blocks, reserved)
    runner.prepare_decode_graphs(limits.max_batch_size)
    return MemoryReport(weight_bytes, runner.kv_cache.nbytes, block_bytes, peak, headroom, free, num_blocks, limits)


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB"
