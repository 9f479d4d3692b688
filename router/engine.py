"""The batching loop: admits requests, runs one shard step at a time, and streams tokens back.

Each iteration asks the scheduler for the next step (decodes of every running request plus
chunks of waiting prompts), sends it to the shard group, and hands every sampled token to its
request (router/output_processor.py): text delta, stop sequences, EOS and length decide when it
ends. A request that ends for any reason (finished, cancelled, failed) leaves the scheduler at once,
which frees its blocks.
The request itself (its events, text state and deadline) is router/generation.py.

With `speculate` k > 0, every decode of a small enough batch may have up to k tokens proposed by the
shards (n-gram lookup over its own tokens, or their draft model; router/speculation.py) and verified
in the same step: a single step reserves the proposals' slots, a multi-step run lets the shards
propose before each of its steps, its length counted in tokens. The shards answer with the tokens
kept, which reach the request one at a time, exactly as a plain decode's would: a stop, EOS or
max_new_tokens inside the run ends the request there and drops the rest.
Grammar-constrained requests speculate too: their matcher lives on the shards, which propose what it
forces and mask each verified row by its state there (shards/grammar.py).
Requests reach it validated (router/validation.py) and through router/replicas.py, which holds the concurrency cap.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator

from mixserve.router.engine_api import FINISH_LENGTH, Limits
from mixserve.router.errors import RouterError, ShardUnavailable
from mixserve.router.generation import Generation
from mixserve.router.metrics import Metrics
from mixserve.router.output_processor import OutputProcessor, keep_prompt_logprobs, prompt_log
from mixserve.router.params import GenerationParams
from mixserve.router.prefix_cache import salted_root
from mixserve.router.scheduler import Scheduler, SchedulerConfig
from mixserve.router.shard_client import ShardGroup, ShardRejected
from mixserve.router.speculation import MAX_BATCH, Speculation
from mixserve.router.step_plan import Sequence, StepPlan
from mixserve.router.steps import SequenceStep, Step, StepResult

log = logging.getLogger("mixserve.router")


class Engine:
    """Owns the scheduler and the shard group; one asyncio task runs the steps."""

    def __init__(
        self,
        group: ShardGroup,
        tokenizer,
        scheduler_config: SchedulerConfig,
        limits: Limits,
        eos_token_ids: tuple[int, ...],
        max_decode_steps: int = 1,
        *,
        metrics: Metrics | None = None,
        ids: Iterator[int] | None = None,
        speculate: int = 0,
        speculate_max_batch: int = MAX_BATCH,
        speculate_cost_back_off: bool = False,
        speculate_constrained: bool = True,
        stream_interval_ms: float = 0.0,
    ) -> None:
        """`metrics` and `ids` (request ids) are shared by the engines of several shard groups behind one
        router (router/replicas.py); alone, an engine has its own. `speculate`: the most tokens proposed
        per decode (0: no speculation), while at most `speculate_max_batch` requests run; the shards
        propose them (their draft model, else n-gram lookup in the request's tokens); with
        `speculate_cost_back_off`, a request whose proposals gain it fewer tokens a step than verifying
        them costs (the shards' step times) pauses (router/speculation.py); with `speculate_constrained`,
        grammar-constrained requests speculate even at `speculate` 0, as requests with a predicted output
        do. `stream_interval_ms`: the
        shards send a multi-step run's steps at most once per this many ms (0: each as it finishes)."""
        self.group = group
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(scheduler_config)
        # Shared metrics read every group's scheduler through router/replicas.py's PooledSchedulers.
        self._own_metrics = metrics is None
        self.metrics = Metrics(self.scheduler) if metrics is None else metrics
        self.speculation = Speculation(
            speculate, speculate_max_batch, speculate_cost_back_off, self.metrics, constrained=speculate_constrained
        )
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.outputs = OutputProcessor(tokenizer, self.eos_token_ids, self.special_ids, self.metrics)
        self.live: dict[int, Generation] = {}
        # Why the shard group is down (None while serving), and, while a restart is coming, the
        # seconds clients are told to wait (Retry-After); the launcher keeps the latter current.
        self.failure: str | None = None
        self.retry_after_s: int | None = None
        # Restarts of the shard group so far, and why it last failed (kept once it serves again).
        self.restarts = 0
        self.last_failure: str | None = None
        self._failed = asyncio.Event()
        self.steps = 0
        self.step_sequences = 0
        self.generated_tokens = 0
        self.cancelled = 0
        self._ids = itertools.count(1) if ids is None else ids
        self._wake = asyncio.Event()
        self._release: list[int] = []
        # Multi-step decode: the most decode steps per shard call, the last run's id, the run that an
        # arrival or a cancellation may still interrupt, and interrupts on their way.
        if max_decode_steps < 1:
            raise ValueError(f"max_decode_steps must be >= 1, got {max_decode_steps}")
        self.max_decode_steps = max_decode_steps
        if stream_interval_ms < 0:
            raise ValueError(f"stream_interval_ms must be >= 0, got {stream_interval_ms}")
        self.stream_interval_us = round(stream_interval_ms * 1000)
        self._run_ids = 0
        self._active_run: int | None = None
        self._interrupts: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission ------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> Generation:
        """Queue a validated, tokenized request (router/validation.py); raises ShardUnavailable while the
        group is down, ValueError if the request could never run in this group's cache."""
        if self.failure is not None:
            raise self.unavailable("the shards are unavailable")
        seq_id = next(self._ids)
        generation = Generation(seq_id, prompt_ids, params, self.tokenizer, self.limits, self.cancel)
        if prompt_log.isEnabledFor(logging.INFO):
            prompt_log.info("event=prompt id=%s text=%r", generation.id, self.tokenizer.decode(prompt_ids))
        self.scheduler.add(
            Sequence(
                seq_id,
                list(prompt_ids),
                params.max_new_tokens,
                payload=generation,
                priority=params.priority,
                compute_prompt=params.prompt_logprobs,
                hash_root=None if params.cache_salt is None else salted_root(params.cache_salt),
            )
        )
        self.live[seq_id] = generation
        self.metrics.on_admitted(len(prompt_ids))
        self._idle.clear()
        self._wake.set()
        self._interrupt_run()  # it joins the batch after the step in progress
        return generation

    def cancel(self, generation: Generation) -> None:
        """The client went away: the request leaves the batch now and its blocks are freed."""
        if generation.done:
            return
        self.cancelled += 1
        self.metrics.on_end("cancelled")
        generated, client_id = generation.generated_tokens, generation.request_id_field
        log.info("event=cancelled id=%s generated=%d%s", generation.id, generated, client_id)
        self._end(generation, None)
        self._interrupt_run()  # it stops costing compute after the step in progress

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mixserve-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def restart(self, group: ShardGroup, scheduler_config: SchedulerConfig) -> None:
        """Serve again from a new shard group. Its KV cache is empty, so the scheduler, block allocator
        and prefix cache start afresh; `fail` has already ended every request of the old group."""
        self.group = group
        self.scheduler = Scheduler(scheduler_config)
        self.restarts += 1
        if self._own_metrics:
            self.metrics.watch(self.scheduler)
        self._release.clear()
        self.failure = None
        self._failed.clear()
        self.start()

    async def wait_failed(self) -> str:
        """Wait until the shard group fails (a step or release failed, or `fail` was called); the reason."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    def down_reason(self) -> str:
        """Why the group does not serve, as clients are told: its failure, and the restart when one is coming."""
        if self.retry_after_s is None:
            return str(self.failure)
        return f"restarting the shard group after {self.failure}"

    def unavailable(self, what: str) -> ShardUnavailable:
        """The error for requests the failed group cannot serve, with Retry-After while a restart is coming."""
        return ShardUnavailable(f"{what}: {self.down_reason()}", self.retry_after_s)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight, up to `timeout_s`; True if it drained."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        # Ends when the group fails: nothing may reach it until `restart` hands over a new one.
        while self.failure is None:
            speculating = self.speculation.allowed(self.scheduler.num_running)
            plan = self.scheduler.schedule()
            if plan is None:
                if not self.live:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._run_steps(plan, time.perf_counter(), speculating)
            except RouterError as e:
                self.fail(str(e))
            except Exception as e:
                # A bug of the router's own: the requests in flight end with it (and the group restarts)
                # rather than wait on a loop that is gone.
                log.exception("event=engine_error error=%r", str(e))
                self.fail(f"internal error in the router's step loop: {e!r}")

    async def _run_steps(self, plan: StepPlan, started: float, speculating: bool) -> None:
        """Run `plan`; when it is all decodes and nothing waits, let the shards run further decode
        steps without a round trip (multi-step decode), each streamed back as it is sampled. Speculating,
        a run's length counts tokens, up to `speculate` + 1 a step."""
        proposals, max_steps = self.speculation.plan_run(
            plan, self.scheduler.num_running, speculating, self.max_decode_steps
        )
        # Speculating sequences gain tokens at different rates: each runs to its own end (run_tokens).
        num_steps = self.scheduler.extend_decode(plan, max_steps, own_budgets=any(proposals.values()))
        if num_steps == 1 and proposals and not plan.preempted:
            self.scheduler.add_proposals(plan, lambda seq: proposals.get(seq.seq_id, 0))
        elif num_steps > 1:
            for entry in plan.sequences:
                entry.speculate = proposals.get(entry.seq.seq_id, 0)
        step = self._step(plan)
        in_flight: StepPlan | None = plan  # the step the shards are running, until its answer is in
        try:
            if num_steps == 1:
                result = await self.group.step(step)
                in_flight = None
                self._on_step_done(plan, result, started)
                return
            self._run_ids += 1
            step.num_steps, step.run_id, step.stream_interval_us = num_steps, self._run_ids, self.stream_interval_us
            self._active_run = self._run_ids
            log.debug("event=decode_run run=%d steps=%d seqs=%d", self._run_ids, num_steps, len(plan.sequences))
            self.metrics.on_decode_run(num_steps)
            # Sequences the shards drop from the run once they have the tokens they had left.
            leaving = {e.seq.seq_id for e in plan.sequences if 0 < e.run_tokens < num_steps}
            first = True
            async for result in self.group.decode_steps(step):
                if in_flight is None:
                    in_flight = self.scheduler.continue_decode(plan)
                plan, in_flight = in_flight, None
                # A run's first step also carries the run's start on the shards: not a step's cost.
                self._on_step_done(plan, result, started, timed=not first)
                first = False
                started = time.perf_counter()
                # The batch should change: one is waiting, or a request ended (finished, or was cancelled)
                # where the shards would go on computing it.
                if self.scheduler.num_waiting or any(
                    e.seq.seq_id not in self.live
                    and not (e.seq.seq_id in leaving and e.seq.payload.finish_reason == FINISH_LENGTH)
                    for e in plan.sequences
                ):
                    self._interrupt_run()
            self.scheduler.end_run(plan)
        except RouterError as e:
            if in_flight is None:
                raise
            for entry in in_flight.sequences:
                self.scheduler.abort(entry.seq.seq_id)
            self.scheduler.on_step_done(in_flight, {})
            if not isinstance(e, ShardRejected):
                raise
            # Every shard refused the step before running it (validation changes nothing): its requests
            # end with the reason, the others and the group go on.
            log.error("event=step_rejected seqs=%d error=%r", len(in_flight.sequences), str(e))
            for entry in in_flight.sequences:
                generation = self.live.get(entry.seq.seq_id)
                if generation is not None:
                    self.metrics.on_end("error")
                    generation.events.put_nowait(e)
                    self._end(generation, None)
        finally:
            self._active_run = None

    def _interrupt_run(self) -> None:
        """Ask the shards to end the multi-step run in progress after its current step (once per run)."""
        run_id, self._active_run = self._active_run, None
        if run_id is None:
            return
        task = asyncio.ensure_future(self.group.interrupt(run_id))
        self._interrupts.add(task)
        task.add_done_callback(self._interrupt_sent)

    def _interrupt_sent(self, task: asyncio.Task) -> None:
        self._interrupts.discard(task)
        # A failed interrupt needs no handling of its own (a group that fails also fails the run's
        # stream); reading its exception keeps asyncio from logging it as never retrieved.
        if not task.cancelled():
            task.exception()

    def _step(self, plan: StepPlan) -> Step:
        """The step the shards run for `plan`; a prefill entry carries its request's sampling settings."""
        sequences = [
            SequenceStep(
                seq_id=entry.seq.seq_id,
                token_ids=entry.token_ids,
                start_position=entry.start_position,
                slot_mapping=entry.slot_mapping,
                block_table=entry.block_table,
                sample=entry.sample,
                prefix_token_ids=entry.prefix_token_ids,
                sampling=entry.seq.payload.sampling() if entry.is_prefill else None,
                prompt_logprobs=entry.is_prefill and entry.seq.compute_prompt,
                num_proposed=entry.num_proposed,
                draft=entry.draft,
                speculate=entry.speculate,
                run_tokens=entry.run_tokens,
            )
            for entry in plan.sequences
        ]
        # The shards forget finished sequences' sampling state as part of the step, not in a call of its own.
        released, self._release = self._release, []
        return Step(sequences, released)

    def _on_step_done(self, plan: StepPlan, result: StepResult, started: float, timed: bool = True) -> None:
        """Hand the step's tokens to their requests; a `timed` all-decode step's shard time joins the step
        costs speculation weighs."""
        now = time.perf_counter()
        keep_prompt_logprobs(plan, result, self.live)
        results = {token.seq_id: token for token in result.tokens if token.sampled}
        self.scheduler.on_step_done(
            plan, {seq_id: [r.token_id] + [n.token_id for n in r.next_tokens] for seq_id, r in results.items()}
        )
        self.steps += 1
        self.step_sequences += len(plan.sequences)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "event=step step=%d decode_seqs=%s prefill_tokens=%d prefill_seqs=%s shard_us=%d ms=%.2f",
                self.steps,
                ",".join(str(e.seq.seq_id) for e in plan.sequences if not e.is_prefill),
                plan.num_prefill_tokens,
                ",".join(str(e.seq.seq_id) for e in plan.sequences if e.is_prefill),
                result.forward_us,
                (now - started) * 1000,
            )
        proposing, step_cost = self.speculation.on_step(plan, result.forward_us, timed)
        delivered = 0
        for seq_id, token in results.items():
            generation = self.live.get(seq_id)
            if generation is None:
                continue
            # Tokens after a stop, EOS or max_new_tokens are dropped, as if never sampled.
            run = [token, *token.next_tokens]
            kept, finish = 0, None
            while kept < len(run) and finish is None:
                finish = self.outputs.on_token(generation, run[kept], now)
                kept += 1
            delivered += kept
            self.generated_tokens += kept
            if self.speculation.on_tokens(generation.speculation, token, kept, seq_id in proposing, step_cost):
                self._interrupt_run()  # it paused: the shards would go on proposing for it until the run ends
            if finish is not None:
                self._end(generation, finish)
        self.metrics.on_step(plan.num_prefill_tokens, plan.num_decode_tokens, now - started, delivered)

    def _end(self, generation: Generation, finish_reason: str | None) -> None:
        generation.done = True
        generation.finish_reason = finish_reason
        self.live.pop(generation.seq_id, None)
        self.scheduler.abort(generation.seq_id)
        self._release.append(generation.seq_id)
        self._wake.set()
        self.outputs.on_end(generation, finish_reason)
        if not self.live:
            self._idle.set()

    def fail(self, reason: str) -> None:
        """The shard group is gone: every request in flight or queued ends with an error (503, with
        Retry-After while a restart is coming), and new ones are refused until `restart`."""
        if self.failure is None:
            self.metrics.on_shard_failure()
            log.error("event=shards_failed reason=%r in_flight=%d", reason, len(self.live))
        # A later call only words the reason better (the launcher names the shard that went silent).
        self.failure = reason
        self.last_failure = reason
        for generation in list(self.live.values()):
            self.metrics.on_end("error")
            generation.events.put_nowait(self.unavailable("the shards failed"))
            self._end(generation, None)
        self._idle.set()
        self._failed.set()
