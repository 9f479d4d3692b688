"""`GET /metrics` of a real `mixserve launch` (2 shards): it parses with prometheus-client's parser
and its counters, histograms and gauges move with HTTP and gRPC traffic."""

import aiohttp
import grpc
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from child_processes import free_port
from launched_server import await_until
from mixserve.router.metrics import INTER_TOKEN_BUCKETS, LoopHistogram, Metrics
from mixserve.router.scheduler import Scheduler, SchedulerConfig
from mixserve_pb import generate_pb2 as pb
from mixserve_pb import generate_pb2_grpc

FAMILIES = {
    "mixserve_requests": "counter",
    "mixserve_request_end": "counter",
    "mixserve_prompt_tokens": "counter",
    "mixserve_generated_tokens": "counter",
    "mixserve_shard_failures": "counter",
    "mixserve_time_to_first_token_seconds": "histogram",
    "mixserve_inter_token_latency_seconds": "histogram",
    "mixserve_request_duration_seconds": "histogram",
    "mixserve_step_duration_seconds": "histogram",
    "mixserve_queue_size": "gauge",
    "mixserve_batch_size": "gauge",
    "mixserve_kv_blocks_used": "gauge",
    "mixserve_kv_blocks_free": "gauge",
    "mixserve_kv_blocks_total": "gauge",
}
GENERATE = "/mixserve.generate.v1.GenerationService/Generate"


class Scrape:
    """One parsed exposition: family types, and sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    grpc_port = free_port()
    started = launch(
        "--model", str(demo_dir), "--num-shard", "2", "--grpc-port", str(grpc_port),
        "--max-batch-prefill-tokens", "64", "--max-batch-size", "8", "--max-kv-blocks", "256",
        "--vllm-metrics", "--served-model-name", "mixtral-test",
    )  # fmt: skip
    started.grpc_address = f"127.0.0.1:{grpc_port}"
    return started


async def scrape(session: aiohttp.ClientSession, server) -> Scrape:
    async with session.get(f"{server.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(await response.text())


@pytest.mark.slow
async def test_counters_and_histograms_move_with_http_and_grpc_traffic(server):
    async with aiohttp.ClientSession() as session:
        before = await scrape(session, server)
        assert FAMILIES.items() <= before.types.items()
        answers = []
        for prompt in ("The old river runs", "seven paper windows"):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": False}
            async with session.post(f"{server.url}/predict", json=body) as response:
                answers.append(await response.json())
        async with session.post(f"{server.url}/predict", json={"prompt": "x", "temperature": -1}) as response:
            assert response.status == 422
        async with session.get(f"{server.url}/no/such/route") as response:
            assert response.status == 404
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            request = pb.GenerateRequest(prompt="green light", parameters=pb.GenerationParameters(max_new_tokens=5))
            unary = await generate_pb2_grpc.GenerationServiceStub(channel).Generate(request)
        after = await scrape(session, server)

    def grew(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    generated = [a["generated_tokens"] for a in answers] + [unary.generated_tokens]
    prompts = [a["prompt_tokens"] for a in answers] + [unary.prompt_tokens]
    assert grew("mixserve_requests_total", api="http", route="/predict", status="200") == 2
    assert grew("mixserve_requests_total", api="http", route="/predict", status="422") == 1
    assert grew("mixserve_requests_total", api="grpc", route=GENERATE, status="OK") == 1
    assert grew("mixserve_requests_total", api="http", route="unmatched", status="404") == 1
    assert grew("mixserve_requests_total", api="http", route="/metrics", status="200") == 1
    assert grew("mixserve_generated_tokens_total") == sum(generated)
    assert grew("mixserve_prompt_tokens_total") == sum(prompts)
    ended = sum(grew("mixserve_request_end_total", reason=r) for r in ("length", "eos_token", "stop_sequence"))
    assert ended == 3
    assert grew("mixserve_time_to_first_token_seconds_count") == 3
    assert grew("mixserve_time_to_first_token_seconds_sum") > 0
    assert grew("mixserve_request_duration_seconds_count") == 3
    assert grew("mixserve_inter_token_latency_seconds_count") == sum(n - 1 for n in generated)
    assert grew("mixserve_inter_token_latency_seconds_bucket", le="+Inf") == sum(n - 1 for n in generated)
    steps = {kind: grew("mixserve_step_duration_seconds_count", kind=kind) for kind in ("prefill", "decode", "mixed")}
    assert steps["prefill"] + steps["mixed"] >= 1 and steps["decode"] >= 1
    assert sum(steps.values()) >= max(generated)
    assert after("mixserve_shard_failures_total") == 0
    assert after("mixserve_queue_size") == after("mixserve_batch_size") == after("mixserve_kv_blocks_used") == 0
    assert after("mixserve_kv_blocks_free") == after("mixserve_kv_blocks_total") > 0


VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:spec_decode_num_draft_tokens": "counter",
    "vllm:spec_decode_num_accepted_tokens": "counter",
    "vllm:spec_decode_num_drafts": "counter",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


@pytest.mark.slow
async def test_vllm_names_read_the_same_counts(server):
    """--vllm-metrics: vLLM's families, labelled with the served model's name, agree with mixserve's own;
    speculation's too (a request with a prediction speculates on this server)."""
    async with aiohttp.ClientSession() as session:
        for prompt in ("A lantern in the hall", "four stone steps"):
            body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "stream": False}
            async with session.post(f"{server.url}/predict", json=body) as response:
                assert response.status == 200
        body = {"prompt": "the cat sat on the mat. the cat sat on the mat. the cat", "max_tokens": 24, "temperature": 0}
        async with session.post(f"{server.url}/v1/completions", json=body) as response:
            text = (await response.json())["choices"][0]["text"]
        async with session.post(
            f"{server.url}/v1/completions", json={**body, "prediction": {"type": "content", "content": text}}
        ) as response:
            assert response.status == 200
        got = await scrape(session, server)
    assert VLLM_FAMILIES.items() <= got.types.items()
    model = {"model_name": "mixtral-test"}
    assert got("vllm:prompt_tokens_total", **model) == got("mixserve_prompt_tokens_total") > 0
    assert got("vllm:generation_tokens_total", **model) == got("mixserve_generated_tokens_total") > 0
    finished = {r: got("vllm:request_success_total", finished_reason=r, **model) for r in ("stop", "length", "abort")}
    ended = {
        r: got("mixserve_request_end_total", reason=r) for r in ("eos_token", "stop_sequence", "length", "cancelled")
    }
    assert finished == {
        "stop": ended["eos_token"] + ended["stop_sequence"],
        "length": ended["length"],
        "abort": ended["cancelled"],
    }
    assert finished["length"] >= 2
    for vllm, own in (
        ("vllm:time_to_first_token_seconds", "mixserve_time_to_first_token_seconds"),
        ("vllm:inter_token_latency_seconds", "mixserve_inter_token_latency_seconds"),
        ("vllm:time_per_output_token_seconds", "mixserve_inter_token_latency_seconds"),
        ("vllm:e2e_request_latency_seconds", "mixserve_request_duration_seconds"),
    ):
        assert got(f"{vllm}_count", **model) == got(f"{own}_count") > 0
        assert got(f"{vllm}_bucket", le="+Inf", **model) == got(f"{own}_bucket", le="+Inf")
    assert got("vllm:num_requests_running", **model) == got("mixserve_batch_size")
    assert got("vllm:num_requests_waiting", **model) == got("mixserve_queue_size")
    usage = got("mixserve_kv_blocks_used") / got("mixserve_kv_blocks_total")
    assert got("vllm:kv_cache_usage_perc", **model) == got("vllm:gpu_cache_usage_perc", **model) == usage
    assert got("vllm:prefix_cache_queries_total", **model) == got("mixserve_prefix_cache_query_tokens_total")
    assert got("vllm:prefix_cache_hits_total", **model) == got("mixserve_prefix_cache_hit_tokens_total")
    verifications = got("mixserve_speculative_verifications_total")
    assert got("vllm:spec_decode_num_drafts_total", **model) == verifications > 0
    accepted = got("mixserve_speculative_accepted_tokens_total")
    assert got("vllm:spec_decode_num_accepted_tokens_total", **model) == accepted > verifications  # runs of 2+
    by_position = [got("mixserve_speculative_accepted_by_position_total", position=str(i)) for i in range(8)]
    assert sum(by_position) == accepted and by_position == sorted(by_position, reverse=True)
    assert by_position == [
        got("vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(i), **model) for i in range(8)
    ]


@pytest.mark.slow
async def test_gauges_show_a_running_stream_and_a_disconnect_is_counted(server):
    async with aiohttp.ClientSession() as session:
        before = await scrape(session, server)
        async with aiohttp.ClientSession() as client:
            response = await client.post(f"{server.url}/predict", json={"prompt": "north", "max_tokens": 400})
            await response.content.read(1)
            during = await scrape(session, server)
            response.close()
        assert during("mixserve_batch_size") + during("mixserve_queue_size") == 1
        assert during("mixserve_kv_blocks_used") > 0
        assert during("mixserve_kv_blocks_free") == during("mixserve_kv_blocks_total") - during(
            "mixserve_kv_blocks_used"
        )

        # The engine counts the cancellation and the HTTP middleware the 499 as the handler unwinds, in
        # either order: wait for both.
        async def counted() -> bool:
            now = await scrape(session, server)
            return now("mixserve_request_end_total", reason="cancelled") > cancelled_before and now(
                "mixserve_requests_total", api="http", route="/predict", status="499"
            ) > before("mixserve_requests_total", api="http", route="/predict", status="499")

        cancelled_before = before("mixserve_request_end_total", reason="cancelled")
        await await_until(counted, "the disconnect counted as cancelled and as a 499", 10, 0.05)
        after = await scrape(session, server)
    assert (
        after("mixserve_request_end_total", reason="cancelled")
        == before("mixserve_request_end_total", reason="cancelled") + 1
    )
    assert after("mixserve_kv_blocks_used") == after("mixserve_batch_size") == 0
    client_gone = after("mixserve_requests_total", api="http", route="/predict", status="499")
    assert client_gone == before("mixserve_requests_total", api="http", route="/predict", status="499") + 1


def test_loop_histogram_exposes_what_prometheus_client_would():
    values = [0.0005, 0.001, 0.0011, 0.02, 0.0200001, 2.5, 7.0, 0.0]
    ours = LoopHistogram(INTER_TOKEN_BUCKETS)
    registry = CollectorRegistry()
    reference = Histogram("x_seconds", "x", buckets=INTER_TOKEN_BUCKETS, registry=registry)
    for value in values:
        ours.observe(value)
        reference.observe(value)
    expected = {s.labels["le"]: s.value for s in next(registry.collect()).samples if s.name == "x_seconds_bucket"}
    assert dict(ours.cumulative()) == expected
    assert ours.total == pytest.approx(sum(values))


def test_each_router_has_its_own_registry():
    config = SchedulerConfig(num_blocks=8, block_size=4, max_batch_prefill_tokens=16, max_running_requests=2)
    first, second = Metrics(Scheduler(config)), Metrics(Scheduler(config))
    first.on_admitted(5)
    first.requests.labels("http", "/predict", "200").inc()
    one = Scrape(generate_latest(first.registry).decode())
    two = Scrape(generate_latest(second.registry).decode())
    assert one("mixserve_prompt_tokens_total") == 5 and two("mixserve_prompt_tokens_total") == 0
    assert one("mixserve_kv_blocks_total") == two("mixserve_kv_blocks_free") == 8
