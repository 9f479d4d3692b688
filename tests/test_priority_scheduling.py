"""`--scheduling-policy priority` on a real `mixserve launch` (1 shard, one sequence running at a time): a
better request (vLLM's `priority`, lower first) preempts the running worse one at once and finishes
before the worse requests queued ahead of it; the preempted request resumes ahead of those of its
priority that came after it, and every request gets all its tokens. /info names the policy."""

import asyncio
import json
import time

import aiohttp
import pytest

pytestmark = pytest.mark.slow

LONG = 300  # tokens of the request the better one interrupts


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch(
        "--model", str(demo_dir), "--num-shard", "1", "--scheduling-policy", "priority", "--max-batch-size", "1"
    )
    yield server
    server.stop()


async def complete(
    session: aiohttp.ClientSession, url: str, name: str, priority: int, tokens: int, events: list
) -> int:
    """Stream one completion; note (time, name, "first" | "done"); the tokens it got."""
    body = {"prompt": f"{name} ", "max_tokens": tokens, "ignore_eos": True, "stream": True, "priority": priority}
    body["stream_options"] = {"include_usage": True}
    got, started = 0, False
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if not started and chunk.get("choices"):
                events.append((time.monotonic(), name, "first"))
                started = True
            if chunk.get("usage"):
                got = chunk["usage"]["completion_tokens"]
    events.append((time.monotonic(), name, "done"))
    return got


async def scenario(url: str) -> tuple[list, dict]:
    events: list = []
    async with aiohttp.ClientSession() as session:
        long = asyncio.create_task(complete(session, url, "long", 5, LONG, events))
        while not events:  # the long request is running
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(complete(session, url, f"low{i}", 5, 8, events)) for i in range(3)]
        await asyncio.sleep(0.3)  # queued behind the running one
        urgent = asyncio.create_task(complete(session, url, "urgent", -1, 8, events))
        got = await asyncio.gather(long, *queued, urgent)
    return events, dict(zip(["long", "low0", "low1", "low2", "urgent"], got, strict=True))


def test_a_better_request_preempts_and_finishes_first(server):
    events, tokens = asyncio.run(scenario(server.url))
    assert tokens == {"long": LONG, "low0": 8, "low1": 8, "low2": 8, "urgent": 8}
    done = [name for _, name, kind in sorted(events) if kind == "done"]
    # Under first come, first served: long, low0, low1, low2, urgent.
    assert done == ["urgent", "long", "low0", "low1", "low2"], events
    firsts = [name for _, name, kind in sorted(events) if kind == "first"]
    assert firsts[:2] == ["long", "urgent"], events


def test_info_names_the_policy_and_priorities_are_bounded(server):
    async def run() -> tuple[str, int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/info") as response:
                policy = (await response.json())["scheduling_policy"]
            for path, body in [
                ("/v1/responses", {"input": "x", "max_output_tokens": 2, "priority": -3}),
                ("/predict", {"prompt": "x", "max_tokens": 2, "priority": 7, "stream": False}),
            ]:
                async with session.post(f"{server.url}{path}", json=body) as response:
                    assert response.status == 200, await response.text()
            body = {"prompt": "x", "max_tokens": 2, "priority": 2**31}
            async with session.post(f"{server.url}/v1/completions", json=body) as response:
                return policy, response.status, await response.text()

    policy, status, text = asyncio.run(run())
    assert policy == "priority"
    assert status == 422 and "priority must be >= -2147483647 and <= 2147483647" in text
