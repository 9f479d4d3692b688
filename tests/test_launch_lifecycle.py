"""The launcher's life: the demo default, API keys, overload, SIGTERM draining, a shard dying."""

import asyncio
import os
import signal

import aiohttp
import pytest

from conftest import LaunchedServer, free_port

pytestmark = pytest.mark.slow


async def get(url: str, path: str, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}{path}", **kwargs) as response:
            return response.status, await response.json()


async def post(url: str, body: dict, **kwargs) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/predict", json=body, **kwargs) as response:
            return response.status, await response.text()


@pytest.fixture(scope="module")
def keyed_server(launch, tmp_path_factory, monkeypatch_module):
    """No --model and no --num-shard: the launcher writes and serves the cached demo checkpoint (in a
    fresh cache) with its default shard count."""
    monkeypatch_module.setenv("MIXSERVE_CACHE", str(tmp_path_factory.mktemp("cache")))
    return launch("--device", "cpu", "--api-key", "sekret", "--max-concurrent-requests", "4")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


async def test_api_key_is_required(keyed_server):
    url = keyed_server.url
    assert (await get(url, "/health"))[0] == 200
    status, body = await get(url, "/info")
    assert status == 401 and body["error_type"] == "authentication"
    status, _ = await post(url, {"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    for header in ("Bearer sekret", "Api-Key sekret"):
        status, text = await post(url, {"prompt": "x", "max_tokens": 2}, headers={"Authorization": header})
        assert status == 200 and text
    assert "sekret" not in keyed_server.log()
    # No --model: the demo, whose text is meaningless, as its shard's log and /info say.
    assert "event=demo_model weights=random" in keyed_server.log()
    status, info = await get(url, "/info", headers={"Authorization": "Bearer sekret"})
    assert status == 200 and info["weights"] == "random"
    # No --num-shard: one shard per core, up to what the demo's 4 KV heads divide.
    cores = len(os.sched_getaffinity(0))
    expected = 4 if cores >= 4 else 2 if cores >= 2 else 1
    assert f"event=host_checked num_shard={expected} replicas=1 device=cpu" in keyed_server.log()


async def test_overload_is_429_and_others_are_unharmed(keyed_server):
    url = keyed_server.url
    auth = {"Authorization": "Bearer sekret"}
    async with aiohttp.ClientSession(headers=auth) as session:
        streams = [await session.post(f"{url}/predict", json={"prompt": "stone", "max_tokens": 300}) for _ in range(4)]
        async with session.post(f"{url}/predict", json={"prompt": "x"}) as extra:
            assert extra.status == 429
            assert (await extra.json())["error_type"] == "overloaded"
        for s in streams:
            s.close()
    for _ in range(100):
        status, info = await get(url, "/info", headers=auth)
        if info["requests_running"] == 0 and info["requests_waiting"] == 0:
            break
        await asyncio.sleep(0.1)
    status, text = await post(url, {"prompt": "x", "max_tokens": 3}, headers=auth)
    assert status == 200 and text


def start_server(demo_dir, tmp_path, *args: str) -> LaunchedServer:
    server = LaunchedServer(["--model", str(demo_dir), *args], tmp_path / "server.log", free_port())
    server.wait_healthy()
    return server


async def test_sigterm_lets_the_stream_finish(demo_dir, tmp_path):
    server = start_server(demo_dir, tmp_path, "--num-shard", "4")
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{server.url}/predict", json={"prompt": "light", "max_tokens": 40, "temperature": 0}
            )
            first = await response.content.read(1)
            server.process.send_signal(signal.SIGTERM)
            rest = await response.read()
        assert response.status == 200 and (first + rest)
        assert await asyncio.to_thread(server.process.wait, 60) == 0
        assert "generated=40" in server.log()
        # Each shard's output pipe is also held by its multiprocessing resource tracker, so it ends a
        # moment after the shard; a pipe still open at exit was closed on a closed loop.
        assert "Event loop is closed" not in server.log()
    finally:
        server.stop()


async def test_with_no_restarts_a_dead_shard_fails_requests_and_health_and_exits(demo_dir, tmp_path):
    server = start_server(demo_dir, tmp_path, "--num-shard", "4", "--max-restarts", "0")
    try:
        pids = [
            int(line.split("pid=")[1].split()[0]) for line in server.log().splitlines() if "event=shard_started" in line
        ]
        assert len(pids) == 4
        async with aiohttp.ClientSession() as session:
            streams = [
                await session.post(f"{server.url}/predict", json={"prompt": "north", "max_tokens": 2000})
                for _ in range(3)
            ]
            for s in streams:
                await s.content.read(1)
            os.kill(pids[2], signal.SIGKILL)
            for s in streams:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(s.read(), 10)
            status, body = await get(server.url, "/health")
            assert status == 503 and "shard 2" in body["error"] and body["status"] == "unavailable"
        assert await asyncio.to_thread(server.process.wait, 60) != 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert "event=shard_group_failed restarts=0 max_restarts=0" in server.log()
    finally:
        server.stop()
