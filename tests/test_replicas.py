"""Two shard groups (replicas) behind one real `mixserve launch` router, one demo shard each: requests
spread over both, greedy text is the same from either, and when one group's shard is killed its streams
fail while the other group keeps serving; the group restarts and comes back, or, past --max-restarts,
is taken out for good. Where each request went, each group's state and restarts are read from /info and
/metrics, the shards from the process table."""

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from child_processes import free_port, subprocess_env
from launched_server import LaunchedServer, await_until, wait_until

pytestmark = pytest.mark.slow

# A small step budget and cache: warmup runs one largest step, which dominates a (re)start on CPU.
SMALL = ("--max-batch-prefill-tokens", "64", "--max-batch-size", "8", "--max-kv-blocks", "256")
TWO_GROUPS = ("--num-shard", "1", "--replicas", "2", *SMALL)
# A restart of one demo shard on a busy 2-core machine, with room to spare.
RESTART_BUDGET_S = 120


def shard_pid(server: LaunchedServer, group: int) -> int:
    """The pid of `group`'s one shard now."""
    (pid,) = [shard.pid for shard in server.shards() if shard.group == group]
    return pid


async def wait_for_group(session: aiohttp.ClientSession, url: str, group: int, status: str, restarts: int) -> None:
    """Wait until /info shows `group` in `status` after `restarts` restarts."""

    async def there() -> bool:
        entry = (await info_groups(session, url))[group]
        return entry["status"] == status and entry["restarts"] == restarts

    await await_until(there, f"group {group} {status} after {restarts} restarts", RESTART_BUDGET_S)


async def predict(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """A greedy streamed /predict read to its end: (request id, text)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    async with session.post(f"{url}/predict", json=body) as response:
        assert response.status == 200, await response.text()
        return response.headers["X-Request-Id"], await response.text()


async def info_groups(session: aiohttp.ClientSession, url: str) -> list[dict]:
    async with session.get(f"{url}/info") as response:
        return (await response.json())["shard_groups"]


@pytest.fixture(scope="module")
def two_groups(launch, demo_dir) -> LaunchedServer:
    return launch("--model", str(demo_dir), *TWO_GROUPS)


async def test_concurrent_requests_spread_over_both_groups_with_the_same_greedy_text(two_groups):
    url = two_groups.url
    async with aiohttp.ClientSession() as session:
        before = await info_groups(session, url)
        answers = await asyncio.gather(*(predict(session, url, "The river", 16) for _ in range(16)))
        groups = await info_groups(session, url)
        async with session.get(f"{url}/metrics") as response:
            metrics = await response.text()
    served_by = [groups[g]["requests_routed"] - before[g]["requests_routed"] for g in (0, 1)]
    assert sum(served_by) == 16 and min(served_by) >= 1, served_by
    # Greedy decoding of one prompt: every group gives the same text.
    assert len({text for _, text in answers}) == 1 and answers[0][1]
    for group in (0, 1):
        assert groups[group]["status"] == "serving" and groups[group]["restarts"] == 0
        routed = groups[group]["requests_routed"]
        assert f'mixserve_group_requests_total{{group="{group}"}} {routed}.0' in metrics
        assert f'mixserve_group_up{{group="{group}"}} 1.0' in metrics


@pytest.fixture
def restarting(demo_dir, tmp_path):
    args = ["--model", str(demo_dir), *TWO_GROUPS, "--max-restarts", "1"]
    server = LaunchedServer(args, tmp_path / "server.log", free_port())
    yield server
    server.stop()


async def test_a_killed_group_fails_its_streams_while_the_other_serves_then_comes_back_or_is_taken_out(restarting):
    server, url = restarting, restarting.url
    await asyncio.to_thread(server.wait_healthy)
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "north", "max_tokens": 4000, "temperature": 0}
        streams = await asyncio.gather(*(session.post(f"{url}/predict", json=body) for _ in range(4)))
        # Every stream is past its first token (the headers wait for it): two run on each group.
        assert [g["requests_running"] for g in await info_groups(session, url)] == [2, 2]

        # Group 1's shard dies: its two streams are cut short, group 0's go on, new requests are served.
        os.kill(shard_pid(server, 1), signal.SIGKILL)
        reads = [asyncio.ensure_future(stream.read()) for stream in streams]
        cut, going = await asyncio.wait(reads, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if len(cut) < 2:
            more, going = await asyncio.wait(going, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            cut |= more
        assert len(cut) == 2 and all(isinstance(read.exception(), aiohttp.ClientPayloadError) for read in cut)
        groups = await info_groups(session, url)
        assert groups[0]["status"] == "serving" and groups[0]["requests_running"] == 2
        assert groups[1]["status"] == "restarting", groups[1]
        _, text = await predict(session, url, "south", 8)
        assert text and not any(read.done() for read in going), "group 0's streams ended with group 1's"

        # The restart (the existing logic) brings group 1 back.
        await wait_for_group(session, url, 1, "serving", restarts=1)
        async with session.get(f"{url}/health") as response:
            assert response.status == 200 and (await response.json()) == {"status": "ok"}
        assert [g["status"] for g in await info_groups(session, url)] == ["serving", "serving"]

        # Past --max-restarts the group is taken out for good; the router keeps serving on group 0.
        os.kill(shard_pid(server, 1), signal.SIGKILL)
        await wait_for_group(session, url, 1, "down", restarts=1)
        async with session.get(f"{url}/health") as response:
            health = await response.json()
            assert response.status == 200 and health["status"] == "degraded", health
            assert [g["group"] for g in health["groups_down"]] == [1]
            assert "shard 0" in health["groups_down"][0]["error"]
        routed_before = [g["requests_routed"] for g in await info_groups(session, url)]
        await asyncio.gather(*(predict(session, url, f"west {i}", 8) for i in range(4)))
        groups = await info_groups(session, url)
        assert [g["status"] for g in groups] == ["serving", "down"]
        assert [g["requests_routed"] for g in groups] == [routed_before[0] + 4, routed_before[1]]
        for read in going:
            read.cancel()
        for stream in streams:
            stream.close()
    assert server.process.poll() is None
    # The removed group's shard is stopped; group 0's serves on.
    wait_until(lambda: [shard.group for shard in server.shards()] == [0], "group 1's shard stopped", 30)
    assert server.stop() == 0
    assert "Traceback" not in server.contract_log("a group failure is one log line, never a traceback")


def test_replicas_and_shard_groups_together_are_refused():
    args = ["launch", "--replicas", "2", "--shard-group", "127.0.0.1:1", "--port", str(free_port())]
    done = subprocess.run(
        [sys.executable, "-m", "mixserve.cli", *args], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "event=startup_failed" in done.stderr and "--replicas" in done.stderr
