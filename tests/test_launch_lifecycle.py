"""The launcher's life: the demo default, API keys, overload, SIGTERM draining, a shard dying."""

import argparse
import asyncio
import os
import re
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest
from process_table import gone

from child_processes import free_port
from launched_server import LaunchedServer, await_until
from mixserve.router.shard_standby import guessed_num_shard
from mixserve.shards import huge_pages
from mixserve.shards.cache_dir import cache_root

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
    fresh cache) with its default shard count. The C kernels this machine built are copied in (the
    subject is the checkpoint: building them took ~15 s of this start); the warm-up times afresh."""
    cache = tmp_path_factory.mktemp("cache")
    if (cache_root() / "kernels").is_dir():
        shutil.copytree(cache_root() / "kernels", cache / "kernels")
    monkeypatch_module.setenv("MIXSERVE_CACHE", str(cache))
    return launch("--device", "cpu", "--api-key", "sekret", "--max-concurrent-requests", "4")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


async def test_api_key_is_required(keyed_server):
    """Through the API, and in the log where the log is the contract: the key never reaches it, and the
    demo's start-up line says its weights are random."""
    url = keyed_server.url
    assert (await get(url, "/health"))[0] == 200
    status, body = await get(url, "/info")
    assert status == 401 and body["error_type"] == "authentication"
    status, _ = await post(url, {"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    for header in ("Bearer sekret", "Api-Key sekret"):
        status, text = await post(url, {"prompt": "x", "max_tokens": 2}, headers={"Authorization": header})
        assert status == 200 and text
    log = keyed_server.contract_log("no key in the log; the demo's start-up line says its weights are random")
    assert "sekret" not in log
    # No --model: the demo, whose text is meaningless, as its shard's log and /info say.
    assert "event=demo_model weights=random" in log
    status, info = await get(url, "/info", headers={"Authorization": "Bearer sekret"})
    assert status == 200 and info["weights"] == "random"
    # No --num-shard: one shard per core, up to what the demo's 4 KV heads divide.
    cores = len(os.sched_getaffinity(0))
    expected = 4 if cores >= 4 else 2 if cores >= 2 else 1
    shards = keyed_server.shards()
    assert info["num_shard"] == expected and len(shards) == expected
    # Where the plan is the launcher's guess, the shards started beside the host check.
    guess = guessed_num_shard(argparse.Namespace(device="cpu", num_shard=None, replicas=1))
    assert all(("--standby" in shard.argv) == (guess == expected) for shard in shards)


def test_thp_mem_alloc_enable_puts_a_shards_buffers_on_huge_pages(demo_dir, tmp_path, monkeypatch):
    """THP_MEM_ALLOC_ENABLE=1 in the launcher's environment reaches its shards' torch, whose buffers of 2 MiB
    and more (weights, KV cache) then sit on huge pages where the kernel grants them on request
    (docs/configuration.md, "Huge pages on CPU")."""
    mode = huge_pages.system_mode()
    if mode not in ("madvise", "always"):
        pytest.skip(f"this kernel's huge page mode is {mode}")
    monkeypatch.setenv(huge_pages.TORCH_VARIABLE, "1")
    args = ["--model", str(demo_dir), "--num-shard", "1", "--max-kv-blocks", "256"]
    server = LaunchedServer(args, tmp_path / "server.log", free_port())
    try:
        server.wait_healthy()
        (shard,) = server.shards()
        held = huge_pages.huge_page_bytes(Path(f"/proc/{shard.pid}/smaps_rollup"))
        if held is None:
            pytest.skip("this kernel does not report AnonHugePages")
        assert held >= 16 << 20, f"the shard holds {held} bytes on huge pages"
    finally:
        server.stop()


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

    async def idle() -> bool:
        _, info = await get(url, "/info", headers=auth)
        return info["requests_running"] == 0 and info["requests_waiting"] == 0

    await await_until(idle, "the closed streams left the batch", 10)
    status, text = await post(url, {"prompt": "x", "max_tokens": 3}, headers=auth)
    assert status == 200 and text


def start_server(demo_dir, tmp_path, *args: str) -> LaunchedServer:
    server = LaunchedServer(["--model", str(demo_dir), *args], tmp_path / "server.log", free_port())
    server.wait_healthy()
    return server


async def test_sigterm_lets_the_stream_finish(demo_dir, tmp_path):
    """The stream in flight at SIGTERM gets all its tokens (the same text as before the signal), the
    launcher exits 0, and its log has no asyncio error (the log is the contract: a clean stop is quiet)."""
    server = start_server(demo_dir, tmp_path, "--num-shard", "4")
    body = {"prompt": "light", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/predict", json={**body, "stream": False}) as response:
                whole = await response.json()
            assert whole["generated_tokens"] == 40
            response = await session.post(f"{server.url}/predict", json=body)
            first = await response.content.read(1)
            server.process.send_signal(signal.SIGTERM)
            rest = await response.read()
        assert response.status == 200 and (first + rest).decode() == whole["output"]
        assert await asyncio.to_thread(server.process.wait, 60) == 0
        # Each shard's output pipe is also held by its multiprocessing resource tracker, so it ends a
        # moment after the shard; a pipe still open at exit was closed on a closed loop.
        assert "Event loop is closed" not in server.contract_log("a clean stop logs no asyncio error")
    finally:
        server.stop()


async def test_with_no_restarts_a_dead_shard_fails_requests_and_health_and_exits(demo_dir, tmp_path):
    server = start_server(demo_dir, tmp_path, "--num-shard", "4", "--max-restarts", "0")
    try:
        pids = [shard.pid for shard in server.shards()]
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
            # Failed for good, no restart coming, while the launcher lingers before exiting.
            status, info = await get(server.url, "/info")
            assert status == 200 and info["shard_groups"][0]["status"] == "down", info["shard_groups"]
            assert info["shard_groups"][0]["restarts"] == 0
        assert await asyncio.to_thread(server.process.wait, 60) != 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        server.stop()


async def test_a_tokenizer_that_does_not_load_fails_the_start_in_one_line(demo_dir, tmp_path):
    """The tokenizer loads while the shards start: one that fails ends the launch with exit 1 and one line
    (the log is the contract: the start-up failure an operator reads), and no shard is left running."""
    broken = tmp_path / "model"
    shutil.copytree(demo_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    server = LaunchedServer(["--model", str(broken), "--num-shard", "1"], tmp_path / "server.log", free_port())
    try:
        assert await asyncio.to_thread(server.process.wait, 120) == 1
        log = server.contract_log("the one start-up failure line for a tokenizer that does not load")
        assert f"event=startup_failed error=the tokenizer of {broken} did not load" in log
        assert "Traceback" not in log
        pids = [int(pid) for pid in re.findall(r"event=shard_started rank=\d+ pid=(\d+)", log)]
        assert len(pids) == 1 and all(gone(pid) for pid in pids)
    finally:
        server.stop()
