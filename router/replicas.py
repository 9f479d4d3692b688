"""Several shard groups (replicas) behind one router, as the one engine the fronts talk to.

Each shard group has its own `Engine`: scheduler, block allocator, prefix cache and step loop, since
a request's KV cache lives on its group's shards. `Replicas` implements router/engine_api.py's
`EngineAPI` over one group or many alike: it holds the concurrency cap, sends each new request to the
least-loaded serving group (fewest requests queued or running, then most free KV blocks), and the
request stays there for its whole life. A failed group is skipped (its own requests end with its
error) while the others serve; once the launcher has restarted it, it is chosen again.
"""

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mixserve.router.engine import Engine
from mixserve.router.engine_api import EngineStats, GroupStats, HealthReport, Limits
from mixserve.router.errors import Overloaded, ShardUnavailable
from mixserve.router.generation import Generation
from mixserve.router.metrics import Metrics
from mixserve.router.params import GenerationParams
from mixserve.router.scheduler import SchedulerConfig
from mixserve.router.shard_client import ShardGroup
from mixserve.router.speculation import MAX_BATCH

log = logging.getLogger("mixserve.router")

HEALTH_FAILED = "a shard does not answer Health"


class PooledSchedulers:
    """Every group's scheduler read as one where the Prometheus gauges read a Scheduler: counts are sums
    over the groups."""

    def __init__(self, engines: list[Engine]) -> None:
        self._engines = engines  # read at every access: a restarted group has a new scheduler

    def _sum(self, name: str) -> int:
        return sum(getattr(engine.scheduler, name) for engine in self._engines)

    @property
    def num_waiting(self) -> int:
        return self._sum("num_waiting")

    @property
    def num_running(self) -> int:
        return self._sum("num_running")

    @property
    def num_blocks_used(self) -> int:
        return self._sum("num_blocks_used")

    @property
    def num_blocks_free(self) -> int:
        return self._sum("num_blocks_free")

    @property
    def num_blocks_cached(self) -> int:
        return self._sum("num_blocks_cached")

    @property
    def num_preemptions(self) -> int:
        return self._sum("num_preemptions")

    @property
    def prefix_query_tokens(self) -> int:
        return self._sum("prefix_query_tokens")

    @property
    def prefix_hit_tokens(self) -> int:
        return self._sum("prefix_hit_tokens")

    @property
    def config(self) -> SchedulerConfig:
        """The first group's, with the pooled block count."""
        configs = [engine.scheduler.config for engine in self._engines]
        return dataclasses.replace(configs[0], num_blocks=sum(c.num_blocks for c in configs))


class Replicas:
    """The router's engines, one per shard group, behind the one interface the fronts use."""

    def __init__(self, engines: list[Engine]) -> None:
        if not engines:
            raise ValueError("replicas need at least one engine")
        first = engines[0]
        if any(engine.metrics is not first.metrics for engine in engines):
            raise ValueError("the engines of several shard groups must share one Metrics")
        self.engines = engines
        self.tokenizer = first.tokenizer
        self.special_ids = first.special_ids
        self.eos_token_ids = first.eos_token_ids
        self.limits: Limits = first.limits
        self.metrics: Metrics = first.metrics
        self.routed = [0] * len(engines)  # requests sent to each group
        self.metrics.registry.register(_GroupCollector(self))

    # -- EngineAPI --------------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Whether at least one group serves."""
        return any(engine.failure is None for engine in self.engines)

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> Generation:
        """Queue a validated request on the least-loaded serving group; raises ShardUnavailable when none
        serves, Overloaded past --max-concurrent-requests (counted over every group)."""
        serving = [i for i, engine in enumerate(self.engines) if engine.failure is None]
        if not serving:
            raise self.unavailable("the shards are unavailable")
        in_flight = sum(len(engine.live) for engine in self.engines)
        if in_flight >= self.limits.max_concurrent_requests:
            raise Overloaded(
                f"{in_flight} requests in flight, the limit is {self.limits.max_concurrent_requests}; retry later"
            )
        group = min(serving, key=self._load)
        generation = self.engines[group].submit(prompt_ids, params)
        self.routed[group] += 1
        log.info("event=routed id=%s group=%d", generation.id, group)
        return generation

    def _load(self, group: int) -> tuple[int, int, int]:
        """Sort key, least loaded first: the fewest requests queued or running, then the most free KV
        blocks, then the lowest group id. (Validation sized the request to the smallest group's cache.)"""
        scheduler = self.engines[group].scheduler
        return (scheduler.num_waiting + scheduler.num_running, -scheduler.num_blocks_free, group)

    def cancel(self, generation: Generation) -> None:
        """The client went away: the request leaves its group's batch now."""
        generation.cancel()

    async def health(self) -> HealthReport:
        """No group serving: the error requests get. Otherwise each group that cannot serve now, with
        why: failed, or a shard that does not answer Health."""
        serving = [i for i, engine in enumerate(self.engines) if engine.failure is None]
        if not serving:
            return HealthReport(self.unavailable("the shards are unavailable"), {}, len(self.engines))
        answers = await asyncio.gather(*(self.engines[i].group.health() for i in serving))
        down = {i: engine.failure for i, engine in enumerate(self.engines) if engine.failure is not None}
        down.update({i: HEALTH_FAILED for i, ok in zip(serving, answers, strict=True) if not ok})
        return HealthReport(None, dict(sorted(down.items())), len(self.engines))

    def stats(self) -> EngineStats:
        """Counts summed over the groups; the batching configuration is the first group's, and what one
        sequence may hold the smallest group's (a request's KV lives on one group)."""
        schedulers = [engine.scheduler for engine in self.engines]
        config = schedulers[0].config
        return EngineStats(
            limits=self.limits,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            block_size=config.block_size,
            max_sequence_blocks=min(s.config.max_blocks for s in schedulers),
            max_batch_prefill_tokens=config.max_batch_prefill_tokens,
            max_batch_total_tokens=config.max_batch_total_tokens,
            max_batch_size=config.max_running_requests,
            prefix_caching=config.enable_prefix_caching,
            kv_blocks_total=sum(s.config.num_blocks for s in schedulers),
            kv_blocks_used=sum(s.num_blocks_used for s in schedulers),
            kv_blocks_free=sum(s.num_blocks_free for s in schedulers),
            kv_blocks_cached=sum(s.num_blocks_cached for s in schedulers),
            prefix_cache_query_tokens=sum(s.prefix_query_tokens for s in schedulers),
            prefix_cache_hit_tokens=sum(s.prefix_hit_tokens for s in schedulers),
            requests_waiting=sum(s.num_waiting for s in schedulers),
            requests_running=sum(s.num_running for s in schedulers),
            steps=sum(e.steps for e in self.engines),
            step_sequences=sum(e.step_sequences for e in self.engines),
            generated_tokens=sum(e.generated_tokens for e in self.engines),
            cancelled_requests=sum(e.cancelled for e in self.engines),
            speculate=self.engines[0].speculation.k,
            speculative_proposed_tokens=sum(e.speculation.proposed for e in self.engines),
            speculative_accepted_tokens=sum(e.speculation.accepted for e in self.engines),
            groups=tuple(self._group_stats(i) for i in range(len(self.engines))),
        )

    def _group_stats(self, i: int) -> GroupStats:
        engine = self.engines[i]
        scheduler = engine.scheduler
        return GroupStats(
            group=i,
            error=engine.failure,
            restarting=engine.failure is not None and engine.retry_after_s is not None,
            restarts=engine.restarts,
            last_failure=engine.last_failure,
            num_shard=len(engine.group.addresses),
            requests_routed=self.routed[i],
            requests_waiting=scheduler.num_waiting,
            requests_running=scheduler.num_running,
            kv_blocks_total=scheduler.config.num_blocks,
            kv_blocks_free=scheduler.num_blocks_free,
            steps=engine.steps,
            generated_tokens=engine.generated_tokens,
            speculation_step_us=engine.speculation.costs.table() if engine.speculation.costs is not None else (),
        )

    # -- failure ----------------------------------------------------------------------------------

    @property
    def retry_after_s(self) -> int | None:
        """Seconds until the soonest restart of a failed group, None when none is coming."""
        waits = [e.retry_after_s for e in self.engines if e.retry_after_s is not None]
        return min(waits) if waits else None

    @retry_after_s.setter
    def retry_after_s(self, value: int | None) -> None:
        for engine in self.engines:
            engine.retry_after_s = value

    def unavailable(self, what: str) -> ShardUnavailable:
        """The error for requests no group can serve, with Retry-After while a restart is coming; each
        group's reason is named after its number when there are several."""
        reasons = [engine.down_reason() for engine in self.engines]
        if len(reasons) > 1:
            reasons = ["every shard group failed: " + "; ".join(f"group {i}: {r}" for i, r in enumerate(reasons))]
        return ShardUnavailable(f"{what}: {reasons[0]}", self.retry_after_s)

    # -- lifecycle (the launcher's) ---------------------------------------------------------------

    @property
    def live(self) -> dict[int, Generation]:
        """Every request in flight or queued, over all groups (request ids are unique across them)."""
        return {seq_id: g for engine in self.engines for seq_id, g in engine.live.items()}

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def stop(self) -> None:
        await asyncio.gather(*(engine.stop() for engine in self.engines))

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no group has anything in flight, up to `timeout_s`; True if all drained."""
        return all(await asyncio.gather(*(engine.drain(timeout_s) for engine in self.engines)))

    def fail(self, reason: str) -> None:
        """End every request of every group with an error (the server is stopping)."""
        for engine in self.engines:
            engine.fail(reason)


def build_replicas(
    groups: list[tuple[ShardGroup, SchedulerConfig]],
    tokenizer,
    limits: Limits,
    eos_token_ids: tuple[int, ...],
    max_decode_steps: int,
    speculate: int = 0,
    speculate_max_batch: int = MAX_BATCH,
    stream_interval_ms: float = 0.0,
    speculate_cost_back_off: bool = False,
    speculate_constrained: bool = True,
) -> Replicas:
    """One engine per (shard group, its scheduler config), sharing one Metrics, whose gauges read their
    pooled schedulers, and one request id sequence, so ids are unique across groups."""
    engines: list[Engine] = []
    metrics = Metrics(PooledSchedulers(engines))  # filled below; read only when Prometheus scrapes
    ids: Iterator[int] = itertools.count(1)
    for group, config in groups:
        engine = Engine(
            group,
            tokenizer,
            config,
            limits,
            eos_token_ids,
            max_decode_steps,
            metrics=metrics,
            ids=ids,
            speculate=speculate,
            speculate_max_batch=speculate_max_batch,
            speculate_cost_back_off=speculate_cost_back_off,
            speculate_constrained=speculate_constrained,
            stream_interval_ms=stream_interval_ms,
        )
        engines.append(engine)
    return Replicas(engines)


class _GroupCollector(Collector):
    """Per-group series for Prometheus, labelled `group`, read at scrape time."""

    def __init__(self, replicas: Replicas) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mixserve_group_up", "1 while the shard group serves, else 0.", labels=["group"])
        routed = CounterMetricFamily("mixserve_group_requests", "Requests sent to the shard group.", labels=["group"])
        queue = GaugeMetricFamily("mixserve_group_queue_size", "Requests waiting, per group.", labels=["group"])
        batch = GaugeMetricFamily("mixserve_group_batch_size", "Requests running, per group.", labels=["group"])
        free = GaugeMetricFamily("mixserve_group_kv_blocks_free", "KV blocks still free, per group.", labels=["group"])
        for i, engine in enumerate(self._replicas.engines):
            label, scheduler = [str(i)], engine.scheduler
            up.add_metric(label, 1 if engine.failure is None else 0)
            routed.add_metric(label, self._replicas.routed[i])
            queue.add_metric(label, scheduler.num_waiting)
            batch.add_metric(label, scheduler.num_running)
            free.add_metric(label, scheduler.num_blocks_free)
        yield from (up, routed, queue, batch, free)
