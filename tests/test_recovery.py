"""Shard failure recovery of a real `mixserve launch` (2 shards): a shard killed or stopped mid-stream
fails every request at once, the launcher restarts the whole group and serves again; a stop during
start-up leaves no shard behind. Shards are found in the process table (the launcher's children), the
restarts and their reasons in /info and /metrics."""

import asyncio
import os
import signal

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from process_table import gone

from child_processes import free_port
from launched_server import LaunchedServer, await_until, wait_until
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
    """The pids of the launcher's shards now, in rank order."""
    return [shard.pid for shard in server.shards()]


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


async def group_info(session: aiohttp.ClientSession, url: str) -> dict:
    """The shard group's entry of /info."""
    async with session.get(f"{url}/info") as response:
        return (await response.json())["shard_groups"][0]


async def assert_restarting(session: aiohttp.ClientSession, url: str, shard: str) -> None:
    """/health and every API refuse with 503, the reason and a Retry-After while the group restarts."""
    async with session.get(f"{url}/health") as response:
        body = await response.json()
        assert response.status == 503 and body["status"] == "restarting", body
        assert shard in body["error"] and body["error_type"] == "unavailable"
        assert int(response.headers["Retry-After"]) >= 1
    group = await group_info(session, url)
    assert group["status"] == "restarting" and shard in group["error"], group
    async with session.post(f"{url}/predict", json={"prompt": "x"}) as response:
        body = await response.json()
        assert response.status == 503 and body["error_type"] == "unavailable" and shard in body["error"]
        assert int(response.headers["Retry-After"]) >= 1
    async with session.post(f"{url}/v1/completions", json={"prompt": "x"}) as response:
        body = await response.json()
        assert response.status == 503 and body["error"]["type"] == "server_error"
        assert int(response.headers["Retry-After"]) >= 1


async def wait_until_serving(session: aiohttp.ClientSession, url: str) -> None:
    async def healthy() -> bool:
        async with session.get(f"{url}/health") as response:
            return response.status == 200

    await await_until(healthy, "serving again", RESTART_BUDGET_S)


async def assert_serves_again(session: aiohttp.ClientSession, server: LaunchedServer, old_pids: list[int]) -> None:
    """A request succeeds on the new group, the restart is counted once (/metrics, /info), and the old
    shards are gone, two new ones in their place."""
    await wait_until_serving(session, server.url)
    async with session.post(f"{server.url}/predict", json={"prompt": "south", "max_tokens": 8, "stream": False}) as r:
        assert r.status == 200 and (await r.json())["generated_tokens"] >= 1
    async with session.get(f"{server.url}/metrics") as response:
        metrics = await response.text()
    assert "mixserve_shard_restarts_total 1.0" in metrics
    assert "mixserve_shard_failures_total 1.0" in metrics
    group = await group_info(session, server.url)
    assert group["status"] == "serving" and group["restarts"] == 1, group
    new_pids = shard_pids(server)
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
        assert (await group_info(session, killed.url))["last_failure"] == "shard 1 exited with code -9"
    assert killed.stop() == 0
    assert "Traceback" not in killed.contract_log("a shard failure is one log line, never a traceback")


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

        async def blamed() -> bool:
            return "stopped answering" in ((await group_info(session, stopped.url))["last_failure"] or "")

        # The engine fails on the deadline first; the launcher then asks every shard and names the silent one.
        await await_until(blamed, "the stopped shard named as the failure")
        failure = (await group_info(session, stopped.url))["last_failure"]
        assert "shard 1 stopped answering" in failure and "DEADLINE_EXCEEDED" in failure, failure
        await assert_serves_again(session, stopped, pids)
    assert stopped.stop() == 0
    assert "Traceback" not in stopped.contract_log("a shard failure is one log line, never a traceback")


async def test_sigterm_during_startup_leaves_no_shard_behind(demo_dir, tmp_path):
    server = start_server(demo_dir, tmp_path)
    try:
        await asyncio.to_thread(wait_until, lambda: len(shard_pids(server)) == 2, "both shards started", 60, 0.02)
        pids = shard_pids(server)
        # The shards are still importing torch and loading: the router does not listen yet.
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as session, session.get(f"{server.url}/health"):
                pass
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.process.wait, 60) == 0
        assert all(gone(pid) for pid in pids)
        assert "Traceback" not in server.contract_log("a stop during start-up is quiet, never a traceback")
    finally:
        server.stop()
