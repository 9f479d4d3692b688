"""The batching loop: admits requests, runs one shard step at a time, and streams tokens back.

Each iteration asks the scheduler for the next step (decodes of every running request plus
chunks of waiting prompts), sends it to the shard group, and hands every sampled token to its
request: text delta, stop sequences, EOS and length decide when it ends. A request that ends for
any reason (finished, cancelled, failed) leaves the scheduler at once, which frees its blocks.
"""

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mixserve_pb import shard_pb2
from router.detokenizer import IncrementalDetokenizer
from router.errors import Overloaded, RouterError, ShardUnavailable, ValidationError
from router.metrics import Metrics
from router.params import GenerationParams
from router.scheduler import Scheduler, SchedulerConfig, Sequence, StepPlan
from router.shard_client import ShardGroup
from router.stop_sequences import StopSequenceMatcher

log = logging.getLogger("mixserve.router")

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"


@dataclass(slots=True)
class TokenEvent:
    """One generated token as a client sees it; `finish_reason` is set on the last one."""

    token_id: int
    text: str
    logprob: float
    special: bool
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Limits:
    """Admission limits (flags of the same names)."""

    max_concurrent_requests: int = 128
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.max_input_tokens < self.max_total_tokens:
            raise ValueError(
                f"need 1 <= max_input_tokens ({self.max_input_tokens}) < max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")


class Generation:
    """A live request: its sequence, its text state, and the queue its client reads events from."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: GenerationParams, engine: "Engine") -> None:
        self.id = f"req-{seq_id}"
        self.seq_id = seq_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.detokenizer = IncrementalDetokenizer(engine.tokenizer, prompt_ids)
        self.stops = StopSequenceMatcher(params.stop)
        self.events: asyncio.Queue[TokenEvent | RouterError] = asyncio.Queue()
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.done = False
        self._engine = engine

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated_tokens(self) -> int:
        return len(self.output_ids)

    def sampling_proto(self) -> shard_pb2.SamplingParams:
        p = self.params
        return shard_pb2.SamplingParams(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            seed=self.seed,
            top_n_tokens=p.top_n_tokens,
        )

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """The request's events until its last; raises the request's error if it fails.

        Leaving the iteration early (client gone) cancels the request.
        """
        try:
            while True:
                event = await self.events.get()
                if isinstance(event, RouterError):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not self.done:
                self._engine.cancel(self)


class Engine:
    """Owns the scheduler and the shard group; one asyncio task runs the steps."""

    def __init__(
        self,
        group: ShardGroup,
        tokenizer,
        scheduler_config: SchedulerConfig,
        limits: Limits,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.group = group
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(scheduler_config)
        self.metrics = Metrics(self.scheduler)
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.live: dict[int, Generation] = {}
        self.failure: str | None = None
        self.steps = 0
        self.step_sequences = 0
        self.generated_tokens = 0
        self.cancelled = 0
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._release: list[int] = []
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission ------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> Generation:
        """Queue a tokenized request; raises Overloaded, ValidationError or ShardUnavailable."""
        if self.failure is not None:
            raise ShardUnavailable(f"the shards are unavailable: {self.failure}")
        if len(self.live) >= self.limits.max_concurrent_requests:
            raise Overloaded(
                f"{len(self.live)} requests in flight, the limit is {self.limits.max_concurrent_requests}; retry later"
            )
        n = len(prompt_ids)
        if n == 0:
            raise ValidationError("the prompt is empty")
        if n > self.limits.max_input_tokens:
            raise ValidationError(
                f"the prompt has {n} tokens, more than max_input_tokens {self.limits.max_input_tokens}"
            )
        total = n + params.max_new_tokens
        if total > self.limits.max_total_tokens:
            raise ValidationError(
                f"prompt tokens ({n}) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds "
                f"max_total_tokens {self.limits.max_total_tokens}"
            )
        if not self.scheduler.fits(n, params.max_new_tokens):
            raise ValidationError(
                f"prompt tokens ({n}) + max_new_tokens ({params.max_new_tokens}) do not fit the KV cache "
                f"({self.scheduler.config.max_blocks} blocks of {self.scheduler.config.block_size} tokens)"
            )
        seq_id = next(self._ids)
        generation = Generation(seq_id, prompt_ids, params, self)
        self.scheduler.add(Sequence(seq_id, list(prompt_ids), params.max_new_tokens, payload=generation))
        self.live[seq_id] = generation
        self.metrics.on_admitted(n)
        self._idle.clear()
        self._wake.set()
        return generation

    def cancel(self, generation: Generation) -> None:
        """The client went away: the request leaves the batch now and its blocks are freed."""
        if generation.done:
            return
        self.cancelled += 1
        self.metrics.on_end("cancelled")
        log.info("event=cancelled id=%s generated=%d", generation.id, generation.generated_tokens)
        self._end(generation, None)

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mixserve-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight, up to `timeout_s`; True if it drained."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        while True:
            if self._release and self.failure is None:
                ids, self._release = self._release, []
                try:
                    await self.group.release(ids)
                except RouterError as e:
                    self.fail(str(e))
                    continue
            plan = self.scheduler.schedule()
            if plan is None:
                if not self.live:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                response = await self.group.step(self._step_request(plan))
            except RouterError as e:
                for entry in plan.sequences:
                    self.scheduler.abort(entry.seq.seq_id)
                self.scheduler.on_step_done(plan, {})
                self.fail(str(e))
                continue
            self._on_step_done(plan, response, started)

    def _step_request(self, plan: StepPlan) -> shard_pb2.StepRequest:
        steps = []
        for entry in plan.sequences:
            step = shard_pb2.SequenceStep(
                seq_id=entry.seq.seq_id,
                token_ids=entry.token_ids,
                start_position=entry.start_position,
                slot_mapping=entry.slot_mapping,
                block_table=entry.block_table,
                sample=entry.sample,
                prefix_token_ids=entry.prefix_token_ids,
            )
            if entry.is_prefill:
                step.sampling.CopyFrom(entry.seq.payload.sampling_proto())
            steps.append(step)
        return shard_pb2.StepRequest(sequences=steps)

    def _on_step_done(self, plan: StepPlan, response: shard_pb2.StepResponse, started: float) -> None:
        now = time.perf_counter()
        results = {r.seq_id: r for r in response.results}
        self.scheduler.on_step_done(plan, {seq_id: r.token_id for seq_id, r in results.items()})
        self.steps += 1
        self.step_sequences += len(plan.sequences)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "event=step step=%d decode_seqs=%s prefill_tokens=%d prefill_seqs=%s shard_us=%d ms=%.2f",
                self.steps,
                ",".join(str(e.seq.seq_id) for e in plan.sequences if not e.is_prefill),
                plan.num_prefill_tokens,
                ",".join(str(e.seq.seq_id) for e in plan.sequences if e.is_prefill),
                response.forward_us,
                (now - started) * 1000,
            )
        delivered = 0
        for seq_id, result in results.items():
            generation = self.live.get(seq_id)
            if generation is not None:
                self._on_token(generation, result, now)
                delivered += 1
        self.metrics.on_step(plan.num_prefill_tokens, plan.num_decode_tokens, now - started, delivered)

    def _on_token(self, generation: Generation, result: shard_pb2.SequenceResult, now: float) -> None:
        token_id = result.token_id
        generation.output_ids.append(token_id)
        self.generated_tokens += 1
        if generation.first_token_at is None:
            generation.first_token_at = now
            self.metrics.time_to_first_token.observe(now - generation.created)
        else:
            self.metrics.inter_token_latency.observe(now - generation.last_token_at)
        generation.last_token_at = now
        finish = None
        is_eos = token_id in self.eos_token_ids and not generation.params.ignore_eos
        text, stopped = ("", False) if is_eos else generation.stops.feed(generation.detokenizer.add(token_id))
        if stopped:
            finish = FINISH_STOP
        elif is_eos:
            finish = FINISH_EOS
        elif generation.generated_tokens >= generation.params.max_new_tokens:
            finish = FINISH_LENGTH
        if finish is not None and not stopped:
            text += generation.stops.feed(generation.detokenizer.flush())[0] + generation.stops.flush()
        event = TokenEvent(
            token_id=token_id,
            text=text,
            logprob=result.logprob,
            special=token_id in self.special_ids,
            top_tokens=[(t.token_id, t.logprob) for t in result.top_tokens],
            finish_reason=finish,
        )
        generation.events.put_nowait(event)
        if finish is not None:
            self._end(generation, finish)

    def _end(self, generation: Generation, finish_reason: str | None) -> None:
        generation.done = True
        generation.finish_reason = finish_reason
        self.live.pop(generation.seq_id, None)
        self.scheduler.abort(generation.seq_id)
        self._release.append(generation.seq_id)
        self._wake.set()
        if finish_reason is not None:
            now = time.perf_counter()
            first = generation.first_token_at or now
            self.metrics.on_end(finish_reason, now - generation.created)
            log.info(
                "event=finished id=%s prompt_tokens=%d generated=%d finish=%s ttft_ms=%.1f total_ms=%.1f",
                generation.id,
                generation.prompt_tokens,
                generation.generated_tokens,
                finish_reason,
                (first - generation.created) * 1000,
                (now - generation.created) * 1000,
            )
        if not self.live:
            self._idle.set()

    def fail(self, reason: str) -> None:
        """The shard group is gone: every request in flight ends with an error, new ones are refused."""
        if self.failure is None:
            self.metrics.on_shard_failure()
        self.failure = reason
        log.error("event=shards_failed reason=%r in_flight=%d", reason, len(self.live))
        for generation in list(self.live.values()):
            self.metrics.on_end("error")
            generation.events.put_nowait(ShardUnavailable(f"the shards failed: {reason}"))
            self._end(generation, None)
        self._idle.set()
