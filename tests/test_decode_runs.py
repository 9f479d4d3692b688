"""Multi-step decode through a real `mixserve launch` (2 shards, decode steps through the graph runner's
static buffers): same outputs as one step per call, and arrivals and cancellations still taken within a
step or so of a long run."""

import asyncio
import json
import time

import aiohttp
import pytest

from launched_server import await_until, get_json, get_text, metric, wait_until

pytestmark = pytest.mark.slow

RUN = 64  # --max-decode-steps of the multi-step server: far longer than any interrupt should take


@pytest.fixture(scope="module")
def servers(launch, demo_dir):
    common = ("--model", str(demo_dir), "--num-shard", "2", "--log-level", "debug")
    # The multi-step server's decode steps also go through the decode graph runner's static buffers
    # (eager on the CPU: padding to buckets, the scratch block, the dense MoE where the kernels do not run),
    # and its shards send the steps of 5 ms together (several of the demo's steps a message).
    multi = launch(*common, "--max-decode-steps", str(RUN), "--cuda-graphs", "eager", "--stream-interval-ms", "5")
    return multi, launch(*common, "--max-decode-steps", "1")


async def complete(
    session: aiohttp.ClientSession, url: str, body: dict, after: asyncio.Event | None, started: asyncio.Event
) -> tuple[str, str]:
    """Stream a completion once `after` is set (the previous request has its first token), setting
    `started` at this one's first token; its text and finish reason."""
    if after is not None:
        await after.wait()
    text, finish = [], None
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
                started.set()
    started.set()
    return "".join(text), finish


async def mixed_load(url: str) -> list[tuple[str, str]]:
    """Requests of different lengths, greedy and seeded sampling, each arriving once the one before it
    is decoding: arrivals end runs early."""
    bodies = [
        {"prompt": f"Story {i}: the river", "max_tokens": 6 + 9 * i, "ignore_eos": True}
        | ({"temperature": 0} if i % 2 else {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i})
        for i in range(6)
    ]
    started = [asyncio.Event() for _ in bodies]
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(
            *(complete(session, url, b, started[i - 1] if i else None, started[i]) for i, b in enumerate(bodies))
        )


def decode_runs(url: str) -> tuple[float, float]:
    """(multi-step calls, of them asking for one step) from /metrics' mixserve_decode_run_steps."""
    text = get_text(f"{url}/metrics")
    return metric(text, "mixserve_decode_run_steps_count"), metric(text, 'mixserve_decode_run_steps_bucket{le="1.0"}')


async def test_multi_step_serves_what_single_steps_serve(servers):
    """Same text; the runs are counted in /metrics. Whether the decode graph runner serves is what each shard
    says in its documented start-up line (docs/configuration.md), the contract read here."""
    multi, single = servers
    assert await mixed_load(multi.url) == await mixed_load(single.url)
    runs, one_step = decode_runs(multi.url)
    assert runs > one_step, "the multi-step server never ran a multi-step run"
    assert decode_runs(single.url) == (0, 0)
    startup = "the shards' start-up line on the decode graph runner"
    assert "event=decode_graphs captured=False" in multi.contract_log(startup)
    assert "event=decode_graphs" not in single.contract_log(startup)


async def seen_at_least(seen: list[float], count: int) -> None:
    """Wait until `count` chunks of a stream have arrived."""

    async def enough() -> bool:
        return len(seen) >= count

    await await_until(enough, f"{count} chunks", poll_s=0.005)


async def stream_tokens(session: aiohttp.ClientSession, url: str, body: dict, seen: list[float]) -> str:
    """Stream a completion, appending the arrival time of each chunk to `seen`; the text."""
    text = []
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: {"):
                seen.append(time.perf_counter())
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


async def test_an_arrival_and_a_cancellation_end_a_long_run(servers):
    multi, single = servers
    cancelled_before = get_json(f"{multi.url}/info")["cancelled_requests"]
    long_body = {"prompt": "A long tale of the sea", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        long_seen: list[float] = []
        long_task = asyncio.create_task(stream_tokens(session, multi.url, long_body, long_seen))
        await seen_at_least(long_seen, 20)
        # An arrival mid-run: it must not wait for the run's remaining steps.
        sent = time.perf_counter()
        short_seen: list[float] = []
        await stream_tokens(session, multi.url, {"prompt": "Hello", "max_tokens": 3}, short_seen)
        waited = sum(sent < t < short_seen[0] for t in long_seen)
        assert waited < RUN // 4, f"the long request made {waited} tokens before the arrival's first"

        # A cancellation mid-run: the client goes away after a few tokens.
        cancelled_seen: list[float] = []
        cancelled = asyncio.create_task(
            stream_tokens(session, multi.url, {"prompt": "Bye", "max_tokens": 300, "ignore_eos": True}, cancelled_seen)
        )
        await seen_at_least(cancelled_seen, 5)
        cancelled.cancel()
        long_text = await long_task
    reference, _ = await single_completion(single.url, long_body)
    assert long_text == reference, "arrivals and cancellations changed another request's greedy output"

    def cancelled_now() -> int:
        return get_json(f"{multi.url}/info")["cancelled_requests"]

    wait_until(lambda: cancelled_now() > cancelled_before, "the client's cancellation counted", 30)
    assert cancelled_now() == cancelled_before + 1


async def single_completion(url: str, body: dict) -> tuple[str, str]:
    """One completion alone on the server: its text and finish reason."""
    async with aiohttp.ClientSession() as session:
        return await complete(session, url, body, None, asyncio.Event())
