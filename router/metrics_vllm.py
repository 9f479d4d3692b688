"""The router's metrics under vLLM's names (`--vllm-metrics`), so that dashboards and alerts written for a
vLLM server (its Grafana dashboard, `vllm:num_requests_waiting` autoscaling rules) read mixserve unchanged.

Each family is computed at scrape time from what `Metrics` already counts (router/metrics.py), so serving
pays nothing for it; every sample carries vLLM's `model_name` label. What maps, and how:
- gauges: `num_requests_running` / `num_requests_waiting` (the batch and the queue),
  `kv_cache_usage_perc` and its older name `gpu_cache_usage_perc` (KV blocks held over all, 0 to 1);
- counters: `prompt_tokens`, `generation_tokens`, `num_preemptions`, `request_success` by
  `finished_reason` (stop: EOS or a stop sequence, length, abort: the client left; failed requests are
  not successes), `prefix_cache_queries` / `prefix_cache_hits` (tokens), and speculation's
  `spec_decode_num_draft_tokens` / `spec_decode_num_accepted_tokens` / `spec_decode_num_drafts` and
  `spec_decode_num_accepted_tokens_per_pos` (by `position`);
- histograms: `time_to_first_token_seconds`, `inter_token_latency_seconds` and its older name
  `time_per_output_token_seconds`, `e2e_request_latency_seconds`, with mixserve's buckets.
"""

from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mixserve.router.metrics import LoopHistogram, Metrics

# mixserve's end reasons -> vLLM's finished_reason (cancelled: the client went away; errors are not successes).
FINISHED_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "abort"}


class VllmNames(Collector):
    """`metrics` under vLLM's names, labelled with the served model's name."""

    def __init__(self, metrics: Metrics, model_name: str) -> None:
        self._metrics = metrics
        self._label = [model_name]

    def collect(self) -> Iterator[Metric]:
        m, s = self._metrics, self._metrics.scheduler
        yield self._gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("num_requests_waiting", "Requests waiting for their first step.", s.num_waiting)
        usage = s.num_blocks_used / s.config.num_blocks if s.config.num_blocks else 0.0
        yield self._gauge("kv_cache_usage_perc", "KV cache blocks held, as a fraction of all.", usage)
        yield self._gauge("gpu_cache_usage_perc", "KV cache blocks held (vLLM's older name).", usage)
        yield self._counter("prompt_tokens", "Prompt tokens of admitted requests.", _total(m.prompt_tokens))
        yield self._counter("generation_tokens", "Tokens generated.", _total(m.generated_tokens))
        yield self._counter("num_preemptions", "Sequences preempted for KV cache room.", s.num_preemptions)
        successes = CounterMetricFamily(
            "vllm:request_success", "Requests finished, by reason.", labels=["model_name", "finished_reason"]
        )
        counts = dict.fromkeys(("stop", "length", "abort"), 0.0)
        for sample in m.ended.collect()[0].samples:
            reason = FINISHED_REASONS.get(sample.labels.get("reason", ""))
            if sample.name.endswith("_total") and reason is not None:
                counts[reason] += sample.value
        for reason, count in counts.items():
            successes.add_metric([*self._label, reason], count)
        yield successes
        yield self._counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_query_tokens
        )
        yield self._counter("prefix_cache_hits", "Looked-up tokens found in the prefix cache.", s.prefix_hit_tokens)
        draft = _total(m.speculative_proposed)
        yield self._counter("spec_decode_num_draft_tokens", "Tokens proposed for verification.", draft)
        accepted = _total(m.speculative_accepted)
        yield self._counter("spec_decode_num_accepted_tokens", "Proposed tokens kept.", accepted)
        drafts = m.speculative_verifications
        yield self._counter("spec_decode_num_drafts", "Verifications of one request's proposals.", drafts)
        per_position = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Proposed tokens kept, by their position in the proposals.",
            labels=["model_name", "position"],
        )
        for position, count in enumerate(m.accepted_by_position):
            per_position.add_metric([*self._label, str(position)], count)
        yield per_position
        yield self._histogram("time_to_first_token_seconds", "Admission to first token.", m.time_to_first_token)
        between = "Time between two tokens of one request."
        yield self._histogram("inter_token_latency_seconds", between, m.inter_token_latency)
        yield self._histogram("time_per_output_token_seconds", between + " (vLLM's older name)", m.inter_token_latency)
        yield self._histogram("e2e_request_latency_seconds", "Admission to last token.", m.request_duration)

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"vllm:{name}", documentation, labels=["model_name"])
        family.add_metric(self._label, value)
        return family

    def _counter(self, name: str, documentation: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(f"vllm:{name}", documentation, labels=["model_name"])
        family.add_metric(self._label, value)
        return family

    def _histogram(self, name: str, documentation: str, histogram: LoopHistogram) -> HistogramMetricFamily:
        family = HistogramMetricFamily(f"vllm:{name}", documentation, labels=["model_name"])
        family.add_metric(self._label, histogram.cumulative(), histogram.total)
        return family


def _total(counter: Counter) -> float:
    """An unlabelled counter's value."""
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))
