"""Shard failure recovery of a real `mixserve launch` (2 shards): a shard killed or stopped mid-stream
fails every request at once, the launcher restarts the whole group and serves again; a stop during
start-up leaves no shard behind."""

import asyncio
import os
import re
import signal
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import LaunchedServer, free_port
from mixserve_pb import generate_pb2 as pb
from mixserve_pb import generate_pb2_grpc

pytestmark = pytest.mark.slow

SERVICE = "mixserve.generate.v1.GenerationService"
# A small step budget and cache: shard warmup runs one largest step, which dominates a (re)start on CPU.
SMALL = ("--max-batch-prefill-tokens", "64", "--max-batch-size", "8", "--max-kv-blocks", "256")
STREAMS = 8  # = --max-batch-size: one more request waits in the queue
# How long a restarted group may take to serve again: a start of two demo shards on a busy 2-core
# machine, with room to spare (the launcher's own bound is --shard-timeout).
RESTART_BUDGET_S = 120


def start_server(demo_dir, tmp_path, *args: str) -> LaunchedServer:
    """A 2-shard server on the demo checkpoint; not waited for."""
    args = ("--model", str(demo_dir), "--num-shard", "2", *SMALL, *args)
    return LaunchedServer(list(args), tmp_path / "server.log", free_port())


def shard_pids(server: LaunchedServer) -> list[int]:
    """The pids of every shard the launcher started so far, in start order."""
    return [int(pid) for pid in re.findall(r"event=shard_started rank=\d+ pid=(\d+)", server.log())]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def open_streams(session: aiohttp.ClientSession, url: str) -> list[aiohttp.ClientResponse]:
    """STREAMS long streaming /predict requests, each past its first token (the headers wait for it)."""
    bodies = [{"prompt": f"north {i}", "max_tokens": 4000, "temperature": 0} for i in range(STREAMS)]
    return list(await asyncio.gather(*(session.post(f"{url}/predict", json=body) for body in bodies)))


async def assert_streams_fail(streams: list[aiohttp.ClientResponse]) -> None:
    """Every stream started (200, a first chunk) and is cut short, no final chunk, within 10 s."""
    for stream in streams:
        assert stream.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(stream.read(), 10)


async def queue_one(session: aiohttp.ClientSession, url: str) -> asyncio.Task:
    """A request that waits in the queue behind the running batch (its answer: the task's result)."""

    async def post() -> tuple[int, str | None, dict]:
        async with session.post(f"{url}/predict", json={"prompt": "queued", "max_tokens": 4}) as response:
            return response.status, response.headers.get("Retry-After"), await response.json()

    queued = asyncio.create_task(post())
    for _ in range(200):
        async with session.get(f"{url}/info") as response:
            if (await response.json())["requests_waiting"] == 1:
                return queued
        await asyncio.sleep(0.05)
    raise AssertionError("the request never queued")


async def wait_for_log(server: LaunchedServer, text: str, timeout_s: float = 30) -> str:
    """The first log line holding `text`, once it is there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in server.log().splitlines() if text in line]
        if lines:
            return lines[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no log line with {text!r} after {timeout_s}s:\n{server.log()[-4000:]}")


async def assert_restarting(session: aiohttp.ClientSession, url: str, shard: str) -> None:
    """/health and every API refuse with 503, the reason and a Retry-After while the group restarts."""
    async with session.get(f"{url}/health") as response:
        body = await response.json()
        assert response.status == 503 and body["status"] == "restarting", body
        assert shard in body["error"] and body["error_type"] == "unavailable"
        assert int(response.headers["Retry-After"]) >= 1
    async with session.post(f"{url}/predict", json={"prompt": "x"}) as response:
        body = await response.json()
        assert response.status == 503 and body["error_type"] == "unavailable" and shard in body["error"]
        assert int(response.headers["Retry-After"]) >= 1
    async with session.post(f"{url}/v1/completions", json={"prompt": "x"}) as response:
        body = await response.json()
        assert response.status == 503 and body["error"]["type"] == "server_error"
        assert int(response.headers["Retry-After"]) >= 1


async def wait_until_serving(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + RESTART_BUDGET_S
    while time.monotonic() < deadline:
        async with session.get(f"{url}/health") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not serving again after {RESTART_BUDGET_S}s")


async def assert_serves_again(session: aiohttp.ClientSession, server: LaunchedServer, old_pids: list[int]) -> None:
    """A request succeeds on the new group, the restart is counted once, and the old shards are gone."""
    await wait_until_serving(session, server.url)
    async with session.post(f"{server.url}/predict", json={"prompt": "south", "max_tokens": 8, "stream": False}) as r:
        assert r.status == 200 and (await r.json())["generated_tokens"] >= 1
    async with session.get(f"{server.url}/metrics") as response:
        metrics = await response.text()
    assert "mixserve_shard_restarts_total 1.0" in metrics
    assert "mixserve_shard_failures_total 1.0" in metrics
    assert server.log().count("event=shard_group_restart ") == 1
    new_pids = shard_pids(server)[len(old_pids) :]
    assert len(new_pids) == 2 and not set(new_pids) & set(old_pids)
    assert all(gone(pid) for pid in old_pids)


@pytest.fixture
def killed(demo_dir, tmp_path_factory):
    grpc_port = free_port()
    server = start_server(demo_dir, tmp_path_factory.mktemp("killed"), "--grpc-port", str(grpc_port))
    server.grpc_address = f"127.0.0.1:{grpc_port}"
    yield server
    server.stop()


async def test_a_killed_shard_fails_every_stream_and_the_group_restarts(killed):
    await asyncio.to_thread(killed.wait_healthy)
    pids = shard_pids(killed)
    async with aiohttp.ClientSession() as session:
        streams = await open_streams(session, killed.url)
        queued = await queue_one(session, killed.url)
        os.kill(pids[1], signal.SIGKILL)
        await assert_streams_fail(streams)
        status, retry_after, body = await asyncio.wait_for(queued, 10)
        assert status == 503 and body["error_type"] == "unavailable" and int(retry_after) >= 1
        # The engine may see the failed step before the launcher sees the exit: either names shard 1.
        await assert_restarting(session, killed.url, "shard 1 ")
        async with grpc.aio.insecure_channel(killed.grpc_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generate_pb2_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(prompt="x"))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await assert_serves_again(session, killed, pids)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert "event=shard_group_restart restart=1 max_restarts=3 reason='shard 1 exited with code -9'" in killed.log()
    assert killed.stop() == 0
    assert "Traceback" not in killed.log()


@pytest.fixture
def stopped(demo_dir, tmp_path_factory):
    # A step of this tiny model takes milliseconds; warmup (which may take longer) has no deadline.
    server = start_server(demo_dir, tmp_path_factory.mktemp("stopped"), "--step-timeout", "2")
    yield server
    server.stop()


async def test_a_stopped_shard_trips_the_step_deadline_and_the_group_restarts(stopped):
    await asyncio.to_thread(stopped.wait_healthy)
    pids = shard_pids(stopped)
    async with aiohttp.ClientSession() as session:
        streams = await open_streams(session, stopped.url)
        os.kill(pids[1], signal.SIGSTOP)
        await assert_streams_fail(streams)
        line = await wait_for_log(stopped, "event=shard_group_restart ")
        assert "shard 1 stopped answering" in line and "DEADLINE_EXCEEDED" in line
        await assert_serves_again(session, stopped, pids)
    assert stopped.stop() == 0
    assert "Traceback" not in stopped.log()


async def test_sigterm_during_startup_leaves_no_shard_behind(demo_dir, tmp_path):
    server = start_server(demo_dir, tmp_path)
    try:
        # The shards are still importing torch and loading: nothing is serving yet.
        await wait_for_log(server, "event=shard_started rank=1")
        pids = shard_pids(server)
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.process.wait, 60) == 0
        assert all(gone(pid) for pid in pids)
        assert "event=stopped_during_startup" in server.log() and "event=serving" not in server.log()
        assert "Traceback" not in server.log()
    finally:
        server.stop()
