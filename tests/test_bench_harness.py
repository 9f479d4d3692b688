"""The benchmark harness against real servers: a 1-shard `mixserve launch` of the demo checkpoint
(every API the load generator drives), real shards over gRPC, and the naive baseline."""

import asyncio
import dataclasses
import json
import subprocess

import aiohttp
import pytest
from aiohttp import web

from child_processes import PYTHON, free_port, subprocess_env
from mixserve.benchmarks import report
from mixserve.benchmarks.compare import compare_markdown
from mixserve.benchmarks.interleave import run_interleaved
from mixserve.benchmarks.latency import LatencyConfig, router_overhead, shard_sweep
from mixserve.benchmarks.metrics import RequestRecord, percentile, summarize
from mixserve.benchmarks.roofline import ModelFootprint
from mixserve.benchmarks.serve import ServeConfig, run_benchmark
from mixserve.benchmarks.systems import find_systems
from mixserve.benchmarks.workload import WorkloadConfig, build_requests, count_tokens, load_tokenizer, poisson_arrivals

MAX_CONCURRENT = 3
OUTPUT_LEN = 8


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    grpc_port = free_port()
    started = launch(
        "--model", str(demo_dir), "--num-shard", "1", "--max-kv-blocks", "256", "--max-batch-prefill-tokens", "256",
        "--max-batch-size", "16", "--max-concurrent-requests", str(MAX_CONCURRENT), "--grpc-port", str(grpc_port),
    )  # fmt: skip
    started.grpc_url = f"127.0.0.1:{grpc_port}"
    return started


def bench_config(url: str, demo_dir, target: str, concurrency: list[int], **overrides) -> ServeConfig:
    return ServeConfig(
        url=url,
        model_dir=str(demo_dir),
        target=target,
        concurrency=concurrency,
        num_prompts=overrides.pop("num_prompts", 4),
        warmup=1,
        workload=WorkloadConfig(input_len=16, output_len=overrides.pop("output_len", OUTPUT_LEN), seed=3),
        temperature=1.0,
        top_p=overrides.pop("top_p", 0.9),  # every API must take it
        progress=False,
        **overrides,
    )


def bench(url: str, demo_dir, target: str, concurrency: list[int], **overrides) -> dict:
    return asyncio.run(run_benchmark(bench_config(url, demo_dir, target, concurrency, **overrides), target))


def assert_counts_add_up(result: dict) -> None:
    for level in result["levels"]:
        s, records = level["summary"], level["_records"]
        assert s["requests"] == len(records) == len(level["requests"]) == s["ok"] + s["errors"]
        assert s["errors"] == sum(s["error_kinds"].values())
        for r in records:
            assert r.e2e > 0
            if r.ok:
                assert r.token_times == sorted(r.token_times)
                assert r.ttft is not None and r.ttft <= r.e2e
                assert r.token_times[-1] <= r.e2e


@pytest.mark.slow
@pytest.mark.parametrize("target", ["openai", "tgi", "grpc", "predict"])
def test_counts_add_up_on_every_api(server, demo_dir, target):
    url = server.grpc_url if target == "grpc" else server.url
    result = bench(url, demo_dir, target, [1, MAX_CONCURRENT])
    assert_counts_add_up(result)
    for level in result["levels"]:
        s, records = level["summary"], level["_records"]
        assert s["errors"] == 0 and s["ok"] == 4
        counted = sum(r.output_tokens for r in records)
        if target == "predict":
            # /predict's chunks miss tokens without text; the server's own count replaces them.
            assert s["token_count_method"] == "server"
            assert sum(len(r.token_times) for r in records) <= s["output_tokens_server"] <= 4 * OUTPUT_LEN
            continue
        assert s["output_tokens_counted"] == counted
        if target != "grpc":
            # The server's /info counter, read around the level, saw exactly the tokens counted.
            assert s["output_tokens_server"] == counted
        for r in records:
            if target != "tgi":  # TGI's API has no ignore_eos
                assert r.output_tokens == OUTPUT_LEN
            if target in ("tgi", "grpc"):  # one event or message per token
                assert len(r.token_times) == r.output_tokens
            else:
                assert len(r.token_times) <= r.output_tokens
        # duration_s is published rounded to the millisecond; a level of a few tens of ms moves by ~1 % with it.
        duration = s["duration_s"]
        assert counted / (duration + 0.0005) <= s["output_throughput"] <= counted / (duration - 0.0005)


@pytest.mark.slow
def test_refused_requests_are_counted_as_errors(server, demo_dir, tmp_path):
    result = bench(server.url, demo_dir, "openai", [2 * MAX_CONCURRENT], num_prompts=2 * MAX_CONCURRENT, output_len=24)
    assert_counts_add_up(result)
    s = result["levels"][0]["summary"]
    assert s["errors"] > 0 and s["ok"] >= MAX_CONCURRENT
    assert set(s["error_kinds"]) == {"HTTP 429"}
    assert s["output_tokens_server"] == s["output_tokens_counted"] == 24 * s["ok"]

    report.write_serve_result(result, tmp_path)
    written = json.loads((tmp_path / "serve.json").read_text())
    assert written["levels"][0]["summary"] == s and "_records" not in written["levels"][0]
    assert written["meta"]["machine"]["cores"] >= 1 and written["meta"]["date"]
    assert "| 6 | 6 |" in (tmp_path / "serve.md").read_text()
    for png in ("throughput.png", "latency_cdf.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_shard_step_latency_and_router_overhead(server, demo_dir, tmp_path):
    config = LatencyConfig(
        str(demo_dir), num_shard=1, batch_sizes=[1, 2], seq_lens=[8], prefill_repeats=2, decode_steps=2,
        router_requests=2, shard_args=["--quantize", "int8-wo"],
    )  # fmt: skip
    rows = shard_sweep(config, tmp_path)
    assert [(r["batch"], r["seq_len"]) for r in rows] == [(1, 8), (2, 8)]
    assert {(r["dtype"], r["quantize"]) for r in rows} == {("float32", "int8-wo")}, "the shards took shard_args"
    for r in rows:
        # The client's wall time of a step includes the shard's own forward time.
        assert 0 < r["decode_forward_ms"]["p50"] <= r["decode_ms"]["p50"]
        assert 0 < r["prefill_forward_ms"]["p50"] <= r["prefill_ms"]["p50"]
    [overhead] = router_overhead(config, server.url, rows)
    assert overhead["ttft_ms"]["p50"] > 0
    assert overhead["router_overhead_ms_p50"] == pytest.approx(
        overhead["ttft_ms"]["p50"] - rows[0]["prefill_ms"]["p50"], abs=1e-3
    )
    assert overhead["itl_ms"]["p50"] > 0
    assert overhead["per_token_overhead_ms_p50"] == pytest.approx(
        overhead["itl_ms"]["p50"] - rows[0]["decode_forward_ms"]["p50"], abs=1e-3
    )


@pytest.fixture(scope="module")
def naive_generator(demo_dir):
    """The baseline's model, loaded in the test process rather than a child (saves importing torch and
    transformers again); the module is imported here so that collecting this file stays light."""
    from mixserve.benchmarks.baselines.naive_server import NaiveGenerator

    return NaiveGenerator(str(demo_dir))


async def test_naive_baseline_answers_predict_and_openai(naive_generator, demo_dir):
    from mixserve.benchmarks.baselines.naive_server import build_app

    runner = web.AppRunner(build_app(naive_generator))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "The old river", "max_tokens": 12, "ignore_eos": True, "stream": False}
            async with session.post(f"{url}/predict", json=body) as response:
                answer = await response.json()
            assert answer["generated_tokens"] == 12 and answer["finish_reason"] == "length" and answer["output"]
            async with session.post(f"{url}/predict", json={"prompt": "The old river", "max_tokens": 6}) as response:
                assert response.status == 200 and response.headers["Transfer-Encoding"] == "chunked"
                assert await response.text()
        result = await run_benchmark(bench_config(url, demo_dir, "openai", [2], num_prompts=3))
    finally:
        await runner.cleanup()
    assert_counts_add_up(result)
    s = result["levels"][0]["summary"]
    assert s["ok"] == 3 and s["token_count_method"] == "usage" and s["output_tokens_server"] is None
    assert all(r.output_tokens == OUTPUT_LEN for r in result["levels"][0]["_records"])


@pytest.mark.slow
def test_interleaved_systems_each_get_every_request_and_only_their_own_tokens(server, demo_dir):
    """Two systems (here one server under two names) measured in alternating blocks: each level's
    requests all reach each system, and the server's token count read around each block holds that
    block's requests only (neither the warm-ups nor the other system's blocks)."""
    greedy = dataclasses.replace(bench_config(server.url, demo_dir, "openai", [1, 2], num_prompts=5), temperature=0.0)
    configs = {"a": greedy, "b": dataclasses.replace(greedy)}
    results = asyncio.run(run_interleaved(configs, 4))  # c=1: 4 blocks; c=2: 2 (a block holds >= c requests)
    assert list(results) == ["a", "b"]
    for result in results.values():
        assert_counts_add_up(result)
        assert [(lv["concurrency"], lv["blocks"]) for lv in result["levels"]] == [(1, 4), (2, 2)]
        for level in result["levels"]:
            s, records = level["summary"], level["_records"]
            assert s["ok"] == 5 and s["token_count_method"] == "server"
            assert s["output_tokens_server"] == sum(r.output_tokens for r in records) == 5 * OUTPUT_LEN
    for level_a, level_b in zip(results["a"]["levels"], results["b"]["levels"], strict=True):
        # The same prompts in the same order: greedy, the same outputs.
        assert [r.text for r in level_a["_records"]] == [r.text for r in level_b["_records"]]
        assert len({r.text for r in level_a["_records"]}) > 1
    workload = {"input_len": 16, "output_len": OUTPUT_LEN, "concurrency": [1, 2], "num_prompts": 5}
    workload |= {"rounds": 2, "warmup": 1, "interleave": 4}
    meta = {"meta": report.run_meta(), "client": "test", "roofline": None, "skipped": {}}
    systems = {name: {"meta": {"config": {"target": "openai"}}, **result} for name, result in results.items()}
    table = compare_markdown({**meta, "reference": "a", "workload": workload, "systems": systems})
    assert "up to 4 alternating blocks" in table and "c=1: 4, c=2: 2)" in table


@pytest.mark.slow
def test_compare_skips_missing_peers_and_tabulates(server, demo_dir, tmp_path):
    found, skipped = find_systems(
        ["mixserve-4", "naive", "vllm", "transformers-serve"],
        str(demo_dir),
        [tmp_path / "no-vllm"],
        [tmp_path / "no-tf"],
    )
    assert [s.name for s in found] == ["mixserve-4", "naive"]
    assert set(skipped) == {"vllm", "transformers-serve"} and "no vLLM venv" in skipped["vllm"]

    run = bench(server.url, demo_dir, "openai", [1, 2])
    runs = {"a": run, "b": run}
    result = {
        "meta": report.run_meta(),
        "reference": "a",
        "workload": {
            "input_len": 16,
            "output_len": OUTPUT_LEN,
            "concurrency": [1, 2],
            "num_prompts": 4,
            "rounds": 2,
            "warmup": 1,
        },
        "client": "test",
        "conditions": "",
        "roofline": None,
        "skipped": skipped,
        "systems": runs,
    }
    table = compare_markdown(result)
    assert table.count("| a | openai |") == table.count("| b | openai |") == 2 and table.count("| 1.00× |") == 4
    assert "`vllm` not measured: no vLLM venv" in table


def test_synthetic_prompts_have_the_exact_length_and_are_reproducible(demo_dir):
    tokenizer = load_tokenizer(demo_dir)
    config = WorkloadConfig(input_len=64, output_len=64, output_spread=0.5, seed=7)
    requests = build_requests(tokenizer, config, 20)
    assert [count_tokens(tokenizer, r.prompt) for r in requests] == [64] * 20
    assert all(32 <= r.max_tokens <= 96 for r in requests) and len({r.max_tokens for r in requests}) > 1
    assert requests == build_requests(tokenizer, config, 20)
    assert requests != build_requests(tokenizer, config, 20, stream=1)
    arrivals = poisson_arrivals(2000, 50.0, seed=1)
    assert arrivals == sorted(arrivals) and 2000 / arrivals[-1] == pytest.approx(50, rel=0.1)


def test_percentiles_and_summary():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    ok = RequestRecord(4, 3, ok=True, status=200, e2e=0.5, token_times=[0.1, 0.2, 0.4], output_tokens=3)
    refused = RequestRecord(4, 3, status=429, error="HTTP 429: full", e2e=0.01)
    cut = RequestRecord(4, 3, status=200, error="ClientPayloadError: cut", e2e=0.3, token_times=[0.1])
    s = summarize([ok, refused, cut], duration_s=1.0)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 1, 2)
    assert s["error_kinds"] == {"HTTP 429": 1, "ClientPayloadError": 1}
    assert s["output_throughput"] == 3.0 and s["ttft_ms"]["p50"] == 100.0
    assert s["tpot_ms"]["p50"] == pytest.approx(200.0) and s["itl_ms"]["p50"] == pytest.approx(150.0)


def test_roofline_bytes_match_the_checkpoint(demo_dir):
    model = ModelFootprint.from_pretrained(demo_dir)
    total = json.loads((demo_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    embedding = model.vocab_size * model.hidden_size * 4
    assert model.prefill_bytes() == total - embedding
    assert model.experts_touched(1) == model.experts_per_token
    assert model.experts_touched(256) == pytest.approx(model.num_experts)
    skipped_experts = model.num_layers * (model.num_experts - model.experts_per_token) * model.expert_params * 4
    one_row = model.hidden_size * 4
    assert model.decode_bytes(1, 0) == total - embedding - skipped_experts + one_row + model.kv_bytes_per_token


@pytest.mark.slow
def test_bench_command_is_registered_and_the_client_is_light():
    code = (
        "import contextlib, sys\n"
        "from mixserve.cli import main\n"
        "with contextlib.suppress(SystemExit):\n"
        "    main(['bench', '--help'])\n"
        "assert 'torch' not in sys.modules, 'the harness client imported torch'\n"
    )
    helped = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "latency", "roofline", "compare", "collectives"):
        assert command in helped.stdout


@pytest.mark.slow
def test_collectives_are_timed_on_every_path_in_real_groups(tmp_path):
    cmd = [PYTHON, "-m", "mixserve.cli", "bench", "collectives", "--ranks", "2", "--sizes", "1", "300"]
    done = subprocess.run(
        [*cmd, "--calls", "20", "--out", str(tmp_path)], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "collectives.json").read_text())["rows"]
    assert [(r["path"], r["size"], r["calls"]) for r in rows] == [
        (path, size, 20 if path != "gloo" else 10) for path in ("shm-c", "shm-torch", "gloo") for size in (1, 300)
    ]
    assert all(0 < r["ms"]["p50"] <= r["ms"]["p99"] for r in rows)
    assert "| 2 | gloo | 300 | 10 |" in (tmp_path / "collectives.md").read_text()


@pytest.mark.slow  # a child Python process
def test_a_variants_pythonpath_is_not_shadowed_by_the_working_directory(tmp_path):
    """A server started from a checkout with `python -m` (as the launcher starts its router and shards) imports
    the code on the PYTHONPATH a variant sets, not the checkout's."""
    from mixserve.benchmarks.processes import child_env

    for tree in ("checkout", "worktree"):
        (tmp_path / tree).mkdir()
        (tmp_path / tree / "probe.py").write_text(f"print({tree!r})\n")
    env = {**child_env(), "PYTHONPATH": str(tmp_path / "worktree")}
    done = subprocess.run(
        [PYTHON, "-m", "probe"], cwd=tmp_path / "checkout", env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "worktree", done.stderr
