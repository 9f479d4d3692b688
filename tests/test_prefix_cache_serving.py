"""Prefix caching past the router: the shard's penalty history of a sequence admitted past position 0,
and greedy outputs of a real launched server with and without the cache."""

import asyncio

import aiohttp
import pytest

from child_processes import free_port
from launched_server import LaunchedServer

# -- the shard: a sequence admitted past position 0 --------------------------------------------------


def test_runner_builds_the_penalty_history_from_the_prefix(demo_dir):
    import torch

    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.loader import load_model
    from mixserve.shards.runner import ModelRunner
    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.sequence_step import InvalidStep, SequenceStep

    torch.set_num_threads(1)
    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.float32, 4)
    runner.allocate_cache(16)
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.8)
    prompt = [5, 9, 5, 9, 30, 31, 32, 33, 7, 9, 5]

    def step(seq_id, start, table, prefix=()):
        slots = [table[p // 4] * 4 + p % 4 for p in range(start, len(prompt))]
        return SequenceStep(seq_id, prompt[start:], start, slots, table, True, penalized, list(prefix))

    (alone,) = runner.step([step(1, 0, [0, 1, 2])])
    # Sequence 2 reuses sequence 1's first two blocks and computes the rest into its own block.
    (hit,) = runner.step([step(2, 8, [0, 1, 3], prefix=prompt[:8])])
    assert (hit.token_id, hit.logprob) == pytest.approx((alone.token_id, alone.logprob), abs=1e-5)
    assert runner.sequences[2].history.seen_ids().tolist() == runner.sequences[1].history.seen_ids().tolist()
    assert runner.sequences[2].seen_until == runner.sequences[1].seen_until
    with pytest.raises(InvalidStep, match="prefix tokens"):
        runner.step([step(3, 8, [0, 1, 4], prefix=prompt[:7])])


# -- end to end: a real launch with and without the cache ---------------------------------------------

BLOCK = 16
SYSTEM = " ".join(f"rule {i}: answer briefly and name the river stone light" for i in range(30))
QUESTIONS = ["What is green?", "Where is north?", "Count to seven.", "Describe the market.", "Why paper?"]


@pytest.fixture(scope="module")
def system_prompt_tokens(demo_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(demo_dir)(SYSTEM)["input_ids"])


@pytest.fixture(scope="module")
def servers(demo_dir, tmp_path_factory):
    """Two 2-shard launches started side by side: prefix caching on (the default) and off."""
    flags = ["--model", str(demo_dir), "--num-shard", "2", "--max-batch-prefill-tokens", "128"]
    flags += ["--max-kv-blocks", "256", "--block-size", str(BLOCK)]
    started = []
    for name, extra in (("cached", []), ("uncached", ["--no-prefix-caching"])):
        log = tmp_path_factory.mktemp(f"launch-{name}") / "server.log"
        started.append(LaunchedServer([*flags, *extra], log, free_port()))
    try:
        for server in started:
            server.wait_healthy()
        yield started
    finally:
        for server in started:
            server.stop()


async def generate(session: aiohttp.ClientSession, url: str, system: str, question: str, **params) -> str:
    body = {"prompt": f"{system}\nQ: {question}\nA:", "max_tokens": 12, "temperature": 0, "stream": False, **params}
    async with session.post(f"{url}/predict", json=body) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["output"]


async def workload(url: str) -> tuple[list[str], dict]:
    """One request alone (a miss), then the rest at once (hits), then a penalized hit; and /info."""
    async with aiohttp.ClientSession() as session:
        first = await generate(session, url, SYSTEM, QUESTIONS[0])
        # The model's own continuation early in the prompt: a repetition penalty then changes the answer,
        # but only if the shards know the cached prefix's tokens.
        echoed = f"{first.strip()} {SYSTEM}"
        outputs = [first]
        outputs += await asyncio.gather(
            *(generate(session, url, SYSTEM, q) for q in QUESTIONS[1:]),
            generate(session, url, echoed, QUESTIONS[0], repetition_penalty=1.3),
        )
        outputs.append(await generate(session, url, echoed, QUESTIONS[0], repetition_penalty=1.3))
        async with session.get(f"{url}/info") as response:
            info = await response.json()
    return outputs, info


@pytest.mark.slow
async def test_greedy_outputs_are_identical_with_and_without_the_cache(servers, system_prompt_tokens):
    cached, uncached = servers
    (with_cache, info), (without_cache, off_info) = await asyncio.gather(workload(cached.url), workload(uncached.url))
    assert with_cache == without_cache
    assert with_cache[-1] == with_cache[-2]  # the penalized prompt, a miss then a hit
    assert info["prefix_caching"] and not off_info["prefix_caching"]
    # The 4 other questions and the penalized prompt's second run find the system prompt's full blocks
    # (the last one may tokenize differently with the question after it).
    assert info["prefix_cache_hit_tokens"] >= 5 * (system_prompt_tokens // BLOCK - 1) * BLOCK
    assert info["prefix_cache_query_tokens"] > info["prefix_cache_hit_tokens"]
    assert off_info["prefix_cache_hit_tokens"] == off_info["prefix_cache_query_tokens"] == 0
    assert info["kv_blocks_used"] == 0 and info["kv_blocks_cached"] > 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cached.url}/metrics") as response:
            metrics = await response.text()
    assert f"mixserve_prefix_cache_hit_tokens_total {float(info['prefix_cache_hit_tokens'])}" in metrics
    assert "mixserve_prefix_cache_hit_rate" in metrics


async def hit_tokens_after(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    """The prefix cache's hit tokens that one /v1/completions request added."""

    async def hits() -> int:
        async with session.get(f"{url}/info") as response:
            return (await response.json())["prefix_cache_hit_tokens"]

    before = await hits()
    async with session.post(f"{url}/v1/completions", json={"max_tokens": 2, "temperature": 0, **body}) as response:
        assert response.status == 200, await response.text()
    return await hits() - before


@pytest.mark.slow
async def test_a_cache_salt_shares_cached_blocks_only_with_the_same_salt(servers):
    """vLLM's cache_salt: a prompt cached under one salt is a miss under another and unsalted, a hit under it."""
    url = servers[0].url
    prompt = "Salted: " + " ".join(f"item {i}," for i in range(24))  # several full blocks, shared with no other test
    async with aiohttp.ClientSession() as session:
        assert await hit_tokens_after(session, url, {"prompt": prompt, "cache_salt": "tenant-a"}) == 0
        assert await hit_tokens_after(session, url, {"prompt": prompt, "cache_salt": "tenant-b"}) == 0
        assert await hit_tokens_after(session, url, {"prompt": prompt}) == 0
        assert await hit_tokens_after(session, url, {"prompt": prompt, "cache_salt": "tenant-a"}) > 0
        assert await hit_tokens_after(session, url, {"prompt": prompt}) > 0
        async with session.post(f"{url}/v1/completions", json={"prompt": prompt, "cache_salt": ""}) as response:
            assert response.status == 422 and "cache_salt" in await response.text()
