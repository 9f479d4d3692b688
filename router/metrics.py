"""Prometheus metrics of one router: requests, latencies, the batch and the KV cache.

Each router (its engines, one per shard group) owns a `Metrics` with its own `CollectorRegistry`, so
several routers in one process never clash. The engine loops feed the latency histograms; the queue,
batch and KV block gauges are read from the scheduler when Prometheus scrapes, so the loops pay
nothing for them. `GET /metrics` is router/api_metrics.py.
"""

import bisect
import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mixserve.router.scheduler import Scheduler

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Decode steps the shards run in one call (--max-decode-steps above 1).
DECODE_RUN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A step holds only prompt chunks, only decodes, or both.
STEP_KINDS = ("prefill", "decode", "mixed")
# How a request ended: the engine's finish reasons, a client that left, or a failure.
END_REASONS = ("length", "eos_token", "stop_sequence", "cancelled", "error")


class LoopHistogram:
    """A histogram fed only from the event loop's thread, so it needs no lock.

    prometheus_client's Histogram takes a lock per bucket and per sum, about 2 µs an
    observation; the engine observes once per generated token, so this one is a bisect and two
    additions instead. Exposed through `Metrics`' collector.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (seconds) in the first bucket whose bound is >= value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending with +Inf, as the exposition format wants them."""
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        return buckets


class Metrics:
    """Every metric of one router, registered in its own registry."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mixserve_requests",
            "Requests answered, by API (http, grpc), route and status.",
            ["api", "route", "status"],
            registry=r,
        )
        self.ended = Counter("mixserve_request_end", "Generations ended, by reason.", ["reason"], registry=r)
        self.prompt_tokens = Counter("mixserve_prompt_tokens", "Prompt tokens of admitted generations.", registry=r)
        self.generated_tokens = Counter("mixserve_generated_tokens", "Tokens generated for clients.", registry=r)
        self.shard_failures = Counter("mixserve_shard_failures", "Times the shard group failed.", registry=r)
        self.shard_restarts = Counter("mixserve_shard_restarts", "Shard group restarts.", registry=r)
        self.speculative_proposed = Counter(
            "mixserve_speculative_proposed_tokens", "Tokens proposed by speculation for verification.", registry=r
        )
        self.speculative_accepted = Counter(
            "mixserve_speculative_accepted_tokens", "Proposed tokens that became output.", registry=r
        )
        # Verifications (a request's proposals checked in one step), and the proposals kept at each position
        # of theirs (0: the first proposed), counted as plain ints and read at scrape time: a step of B
        # requests adds up to B * K.
        self.speculative_verifications = 0
        self.accepted_by_position: list[int] = []
        self.time_to_first_token = LoopHistogram(TTFT_BUCKETS)
        self.inter_token_latency = LoopHistogram(INTER_TOKEN_BUCKETS)
        self.request_duration = LoopHistogram(REQUEST_BUCKETS)
        self.step_duration = {kind: LoopHistogram(STEP_BUCKETS) for kind in STEP_KINDS}
        self.decode_run_steps = LoopHistogram(DECODE_RUN_BUCKETS)
        self._ended = {reason: self.ended.labels(reason) for reason in END_REASONS}
        self._live = _LiveCollector(self, scheduler)
        r.register(self._live)
        self.vllm_names = False  # whether router/metrics_vllm.py's collector is registered too

    def watch(self, scheduler: Scheduler) -> None:
        """Read the gauges from `scheduler` from now on (a restarted shard group has a new one)."""
        self._live.scheduler = scheduler

    @property
    def scheduler(self) -> Scheduler:
        """What the gauges read (the pooled schedulers of every shard group)."""
        return self._live.scheduler

    def on_admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def on_step(self, prefill_tokens: int, decode_tokens: int, seconds: float, generated: int) -> None:
        """One shard step finished and handed `generated` tokens to live requests."""
        kind = "decode" if not prefill_tokens else "prefill" if not decode_tokens else "mixed"
        self.step_duration[kind].observe(seconds)
        if generated:
            self.generated_tokens.inc(generated)

    def on_decode_run(self, num_steps: int) -> None:
        """The shards were asked for `num_steps` decode steps in one call (multi-step decode)."""
        self.decode_run_steps.observe(num_steps)

    def on_speculated(self, proposed: int, accepted: int) -> None:
        """A verification step of `proposed` tokens kept `accepted` of them as output."""
        self.speculative_proposed.inc(proposed)
        self.speculative_verifications += 1
        if accepted:
            self.speculative_accepted.inc(accepted)
            counts = self.accepted_by_position
            if len(counts) < accepted:
                counts.extend([0] * (accepted - len(counts)))
            for position in range(accepted):
                counts[position] += 1

    def on_end(self, reason: str, seconds: float | None = None) -> None:
        """A generation ended; `seconds` (its end-to-end latency) only when it finished normally."""
        self._ended[reason].inc()
        if seconds is not None:
            self.request_duration.observe(seconds)

    def on_shard_failure(self) -> None:
        self.shard_failures.inc()

    def on_shard_restart(self) -> None:
        self.shard_restarts.inc()


class _LiveCollector(Collector):
    """The loop-fed histograms, and gauges read from the scheduler at scrape time."""

    def __init__(self, metrics: Metrics, scheduler: Scheduler) -> None:
        self._metrics = metrics
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        m, s = self._metrics, self.scheduler
        yield _histogram("mixserve_time_to_first_token_seconds", "Admission to first token.", m.time_to_first_token)
        yield _histogram(
            "mixserve_inter_token_latency_seconds", "Time between two tokens of one request.", m.inter_token_latency
        )
        yield _histogram(
            "mixserve_request_duration_seconds", "Admission to last token of finished requests.", m.request_duration
        )
        steps = HistogramMetricFamily(
            "mixserve_step_duration_seconds", "Shard step round trips, by kind.", labels=["kind"]
        )
        for kind, histogram in m.step_duration.items():
            steps.add_metric([kind], histogram.cumulative(), histogram.total)
        yield steps
        yield _histogram(
            "mixserve_decode_run_steps", "Decode steps asked of the shards per multi-step call.", m.decode_run_steps
        )
        yield GaugeMetricFamily("mixserve_queue_size", "Requests waiting for their first step.", s.num_waiting)
        yield GaugeMetricFamily("mixserve_batch_size", "Requests in the running batch.", s.num_running)
        yield GaugeMetricFamily("mixserve_kv_blocks_used", "KV cache blocks held by requests.", s.num_blocks_used)
        yield GaugeMetricFamily("mixserve_kv_blocks_free", "KV cache blocks still free.", s.num_blocks_free)
        yield GaugeMetricFamily("mixserve_kv_blocks_total", "KV cache blocks on each shard.", s.config.num_blocks)
        yield GaugeMetricFamily("mixserve_kv_blocks_cached", "KV blocks in the prefix cache.", s.num_blocks_cached)
        yield CounterMetricFamily(
            "mixserve_prefix_cache_query_tokens", "Tokens of admitted requests looked up.", s.prefix_query_tokens
        )
        yield CounterMetricFamily(
            "mixserve_prefix_cache_hit_tokens", "Looked-up tokens found in the prefix cache.", s.prefix_hit_tokens
        )
        yield CounterMetricFamily(
            "mixserve_speculative_verifications",
            "Verifications of one request's proposals in a step (accepted tokens over these, plus 1, is the mean "
            "tokens such a step gains the request).",
            m.speculative_verifications,
        )
        by_position = CounterMetricFamily(
            "mixserve_speculative_accepted_by_position",
            "Proposals kept at each position of a verification's proposals (0: the first; over verifications: "
            "the share kept there).",
            labels=["position"],
        )
        for position, count in enumerate(m.accepted_by_position):
            by_position.add_metric([str(position)], count)
        yield by_position
        hit_rate = s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0
        yield GaugeMetricFamily("mixserve_prefix_cache_hit_rate", "Hit tokens over query tokens since start.", hit_rate)


def _histogram(name: str, documentation: str, histogram: LoopHistogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=histogram.cumulative(), sum_value=histogram.total)
