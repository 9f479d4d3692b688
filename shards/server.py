"""The ShardService of one tensor-parallel shard: the gRPC face of its ModelRunner.

Every shard of a group gets the same calls from the router; the model calls (Warmup, Step,
DecodeSteps, Release, Clear) run one at a time on the shard's model thread (shards/model_thread.py),
whose current device is the shard's, while Info, Health and Interrupt answer at any time.
The process that serves it is started by `mixserve shard` (shards/cli.py).
"""

import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from mixserve.shards import ops
from mixserve.shards.head_rows import measure_head_rows
from mixserve.shards.kernel_tokens import measure_and_cap
from mixserve.shards.loader import weight_bytes
from mixserve.shards.memory import InsufficientMemory, MemoryReport, StepLimits, size_kv_cache
from mixserve.shards.model_thread import ModelThread
from mixserve.shards.multi_step import decode_steps
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sequence_step import InvalidStep, OutOfCapacity, SequenceResult, SequenceStep
from mixserve.shards.step_proto import memory_proto, run_response, step_from_proto, step_response
from mixserve.shards.warmup_timings import TimingsStore
from mixserve_pb import shard_pb2, shard_pb2_grpc

log = logging.getLogger("mixserve.shard")

# On CPU the shards of one host share its memory: each takes this share of what is available,
# up to a cap, unless --max-kv-blocks says otherwise.
CPU_KV_MEMORY_FRACTION = 0.25
CPU_KV_MEMORY_CAP = 2 << 30


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    """The gRPC face of one ModelRunner."""

    def __init__(
        self,
        runner: ModelRunner,
        model_dir: str,
        max_kv_blocks: int,
        quantize: str = "",
        model: ModelThread | None = None,
        warmup_timings: TimingsStore | None = None,
    ) -> None:
        self.runner = runner
        self.model_dir = model_dir
        self.max_kv_blocks = max_kv_blocks
        self.quantize = quantize
        self.model = model or ModelThread(runner.device)
        self.interrupted_run_id = 0
        self.memory: MemoryReport | None = None
        self.warmup_timings = warmup_timings

    def Info(self, request, context):
        r = self.runner
        c = r.config
        cache = r.kv_cache
        return shard_pb2.InfoResponse(
            model_type="mixtral",
            model_path=self.model_dir,
            rank=r.parallel.rank,
            world_size=r.parallel.world_size,
            dtype=str(r.dtype).removeprefix("torch."),
            kv_cache_dtype=str(r.kv_dtype).removeprefix("torch."),
            device=str(r.device),
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            num_experts=c.num_local_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            max_position_embeddings=c.max_position_embeddings,
            block_size=r.block_size,
            num_blocks=cache.num_blocks if cache else 0,
            weight_bytes=weight_bytes(r.model),
            quantize=self.quantize,
            kv_cache_bytes=cache.nbytes if cache else 0,
            memory=memory_proto(self.memory) if self.memory else None,
            kernels=shard_pb2.KernelsReport(**ops.kernels_report(ops.current(), r.dtype)),
        )

    def Health(self, request, context):
        return shard_pb2.HealthResponse(ready=self.runner.kv_cache is not None)

    def Warmup(self, request, context):
        started = time.perf_counter()
        cap = request.max_blocks or self.max_kv_blocks
        if request.max_blocks and self.max_kv_blocks:
            cap = min(request.max_blocks, self.max_kv_blocks)
        r = self.runner
        limits = StepLimits.clamped(
            request.max_batch_tokens,
            request.max_batch_size,
            request.max_context_tokens,
            r.config.max_position_embeddings,
        )
        try:
            self.memory = self.model.run(size_kv_cache, r, limits, weight_bytes(r.model), cap, kv_budget_bytes(r))
        except InsufficientMemory as e:
            log.error("event=warmup_failed rank=%d error=%r", r.parallel.rank, str(e))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        self.model.run(measure_and_cap, r, limits.max_batch_tokens, self.warmup_timings)
        self.model.run(measure_head_rows, r, limits.max_batch_size, self.warmup_timings)
        ms = int((time.perf_counter() - started) * 1000)
        m = self.memory
        log.info(
            "event=warmup rank=%d num_blocks=%d block_size=%d kv_bytes=%d peak_activation_bytes=%d headroom_bytes=%d "
            "free_bytes=%d max_batch_size=%d max_context=%d ms=%d",
            r.parallel.rank,
            m.num_blocks,
            r.block_size,
            m.kv_cache_bytes,
            m.peak_activation_bytes,
            m.headroom_bytes,
            m.free_bytes,
            limits.max_batch_size,
            limits.max_context,
            ms,
        )
        return shard_pb2.WarmupResponse(
            num_blocks=m.num_blocks, block_size=r.block_size, warmup_ms=ms, memory=memory_proto(m)
        )

    def Step(self, request, context):
        started = time.perf_counter_ns()
        try:
            steps = [step_from_proto(s) for s in request.sequences]
            results = self.model.run(self._release_and_step, list(request.release_seq_ids), steps)
        except OutOfCapacity as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (InvalidStep, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return step_response(results, time.perf_counter_ns() - started)

    def DecodeSteps(self, request, context):
        started = time.perf_counter_ns()
        try:
            steps = [step_from_proto(s) for s in request.sequences]
            release = list(request.release_seq_ids)
            run_id = request.run_id

            def run(abandoned: threading.Event) -> Iterator[tuple[list[SequenceResult], int]]:
                self.runner.release(release)

                # A stream its caller dropped stops as an interrupt does: every rank agrees first.
                def agree_to_stop() -> bool:
                    return self.runner.group.any_rank(self.interrupted_run_id >= run_id or abandoned.is_set())

                before = started
                for results in decode_steps(self.runner, steps, request.num_steps, agree_to_stop):
                    now = time.perf_counter_ns()
                    yield results, now - before
                    before = now

            # Only rank 0's answers reach clients: the other ranks send theirs once, at the end,
            # which spares both sides a message per step (the router still reads every stream,
            # to see a rank fail).
            every_step = self.runner.parallel.rank == 0
            interval_s = request.stream_interval_us / 1e6 if every_step else math.inf
            count, batch = 0, []
            for batch in self.model.stream(run, interval_s):
                if every_step:
                    yield run_response(batch, count)
                count += len(batch)
            if not every_step:
                results = batch[-1][0] if batch else []
                yield step_response(results, time.perf_counter_ns() - started, count)
        except OutOfCapacity as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (InvalidStep, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Interrupt(self, request, context):
        # Not on the model thread: the run it stops holds that. Run ids only grow, so an interrupt that overtakes its
        # run's start still stops that run.
        self.interrupted_run_id = max(self.interrupted_run_id, request.run_id)
        return shard_pb2.InterruptResponse()

    def Release(self, request, context):
        self.model.run(self.runner.release, list(request.seq_ids))
        return shard_pb2.ReleaseResponse()

    def Clear(self, request, context):
        self.model.run(self.runner.clear)
        return shard_pb2.ClearResponse()

    def _release_and_step(self, release: list[int], steps: list[SequenceStep]) -> list[SequenceResult]:
        self.runner.release(release)
        return self.runner.step(steps)


def kv_budget_bytes(runner: ModelRunner) -> int:
    """Memory a CPU shard may give its KV cache (on CUDA, Warmup sizes it from free device memory)."""
    available = _mem_available_bytes()
    return min(int(available * CPU_KV_MEMORY_FRACTION), CPU_KV_MEMORY_CAP) // runner.parallel.world_size


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 4 << 30
