"""Two shard groups (replicas) behind one real `mixserve launch` router, one demo shard each: requests
spread over both, greedy text is the same from either, and when one group's shard is killed its streams
fail while the other group keeps serving; the group restarts and comes back, or, past --max-restarts,
is taken out for good."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from conftest import LaunchedServer, free_port, subprocess_env

pytestmark = pytest.mark.slow

# A small step budget and cache: warmup runs one largest step, which dominates a (re)start on CPU.
SMALL = ("--max-batch-prefill-tokens", "64", "--max-batch-size", "8", "--max-kv-blocks", "256")
TWO_GROUPS = ("--num-shard", "1", "--replicas", "2", *SMALL)
# A restart of one demo shard on a busy 2-core machine, with room to spare.
RESTART_BUDGET_S = 120


def routed_groups(server: LaunchedServer) -> dict[str, int]:
    """Request id -> the group the router sent it to, from the log."""
    return {rid: int(g) for rid, g in re.findall(r"event=routed id=(\S+) group=(\d+)", server.log())}


def shard_pids(server: LaunchedServer, group: int) -> list[int]:
    """Pids of every shard started for `group` so far, in start order."""
    pattern = rf"event=shard_started rank=\d+ pid=(\d+) \S+ group={group}\b"
    return [int(pid) for pid in re.findall(pattern, server.log())]


async def wait_for_log(server: LaunchedServer, text: str, count: int = 1, timeout_s: float = RESTART_BUDGET_S) -> None:
    """Wait until `text` is in the log `count` times."""
    deadline = time.monotonic() + timeout_s
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"not {count}x {text!r} after {timeout_s}s:\n{server.log()[-4000:]}"
        await asyncio.sleep(0.1)


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
        answers = await asyncio.gather(*(predict(session, url, "The river", 16) for _ in range(16)))
        groups = await info_groups(session, url)
        async with session.get(f"{url}/metrics") as response:
            metrics = await response.text()
    routed = routed_groups(two_groups)
    served_by = [routed[rid] for rid, _ in answers]
    assert set(served_by) == {0, 1}
    # Greedy decoding of one prompt: every group gives the same text.
    assert len({text for _, text in answers}) == 1 and answers[0][1]
    for group in (0, 1):
        assert groups[group]["status"] == "serving"
        assert groups[group]["requests_routed"] == served_by.count(group)
        assert f'mixserve_group_requests_total{{group="{group}"}} {served_by.count(group)}.0' in metrics
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
        routed = routed_groups(server)
        by_group = {g: [s for s in streams if routed[s.headers["X-Request-Id"]] == g] for g in (0, 1)}
        assert len(by_group[0]) == len(by_group[1]) == 2

        # Group 1's shard dies: its streams are cut short, group 0's go on, new requests are served.
        os.kill(shard_pids(server, 1)[0], signal.SIGKILL)
        for stream in by_group[1]:
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(stream.read(), 10)
        await wait_for_log(server, "event=shard_group_restart restart=1")
        for stream in by_group[0]:
            assert await asyncio.wait_for(stream.content.readany(), 10)
        _, text = await predict(session, url, "south", 8)
        assert text

        # The restart (the existing logic) brings group 1 back.
        await wait_for_log(server, "event=shard_group_restarted restart=1")
        async with session.get(f"{url}/health") as response:
            assert response.status == 200 and (await response.json()) == {"status": "ok"}
        assert [g["status"] for g in await info_groups(session, url)] == ["serving", "serving"]

        # Past --max-restarts the group is taken out for good; the router keeps serving on group 0.
        os.kill(shard_pids(server, 1)[1], signal.SIGKILL)
        await wait_for_log(server, "event=shard_group_removed group=1")
        async with session.get(f"{url}/health") as response:
            health = await response.json()
            assert response.status == 200 and health["status"] == "degraded", health
            assert [g["group"] for g in health["groups_down"]] == [1]
            assert "shard 0" in health["groups_down"][0]["error"]
        routed_before = (await info_groups(session, url))[1]["requests_routed"]
        answers = await asyncio.gather(*(predict(session, url, f"west {i}", 8) for i in range(4)))
        assert {routed_groups(server)[rid] for rid, _ in answers} == {0}
        groups = await info_groups(session, url)
        assert [g["status"] for g in groups] == ["serving", "down"]
        assert groups[1]["requests_routed"] == routed_before
        for stream in by_group[0]:
            stream.close()
    assert server.process.poll() is None
    assert server.stop() == 0
    assert "Traceback" not in server.log()


def test_replicas_and_shard_groups_together_are_refused():
    args = ["launch", "--replicas", "2", "--shard-group", "127.0.0.1:1", "--port", str(free_port())]
    done = subprocess.run(
        [sys.executable, "-m", "mixserve.cli", *args], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "event=startup_failed" in done.stderr and "--replicas" in done.stderr
