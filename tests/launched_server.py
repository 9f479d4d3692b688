"""A real `mixserve launch` server for the tests, and the polling and HTTP helpers they use on servers."""

import asyncio
import json
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
from process_table import ShardProcess, shard_processes

from child_processes import PYTHON, free_port, subprocess_env


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120, poll_s: float = 0.1) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s}s")
        time.sleep(poll_s)


async def await_until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 120, poll_s: float = 0.1
) -> None:
    """`wait_until` for a coroutine condition (an HTTP call), on the event loop."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s}s")
        await asyncio.sleep(poll_s)


def get_json(url: str) -> dict:
    """GET `url` (an /info or /health of a test server) and its JSON body, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def get_text(url: str) -> str:
    """GET `url` (a test server's /metrics) and its body."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


async def post_text(url: str, path: str, body: dict) -> tuple[int, str, str]:
    """POST `body` as JSON to a test server's `path`: the status, the content type and the body's text."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}{path}", json=body) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.text()


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus text exposition: `name` with its suffix and labels as exposed, e.g.
    `mixserve_shard_restarts_total` or `mixserve_decode_run_steps_bucket{le="1.0"}`."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(f"no sample {name} in the metrics")


class LaunchedServer:
    """A real `mixserve launch` child process; its log goes to a file the tests can read."""

    def __init__(self, args: list[str], log_path: Path, port: int) -> None:
        # float32 unless the test asks otherwise: the oracles (transformers, in-process references, a server of
        # other shards) compute in it, and `auto` is bfloat16 on CPUs with avx512_bf16, where one shard and
        # two round differently and greedy picks may part.
        if "--dtype" not in args:
            args = ["--dtype", "float32", *args]
        # A KV cache of 4096 blocks unless the test sizes its own: sized from memory it is 2 GiB, and
        # zeroing it took ~2 s of every start (the sizing still runs; the cap takes the smaller).
        if "--max-kv-blocks" not in args:
            args = ["--max-kv-blocks", "4096", *args]
        self.port = port
        # Over TLS (--ssl-certfile, a self-signed certificate in the tests): https, trusting that certificate.
        certfile = args[args.index("--ssl-certfile") + 1] if "--ssl-certfile" in args else None
        self.ssl_context = None if certfile is None else ssl.create_default_context(cafile=certfile)
        self.url = f"{'http' if certfile is None else 'https'}://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [PYTHON, "-m", "mixserve.cli", "launch", "--port", str(port), *args],
            env=subprocess_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def contract_log(self, contract: str) -> str:
        """The whole log, for a test whose subject is what the log says (`contract`: why this log line is
        what an operator reads, e.g. "the one-line start-up refusal"). Everything else a test checks
        through the API, the metrics or the process table; tests/test_log_contracts.py holds every
        caller to a reason."""
        if len(contract.split()) < 3:
            raise ValueError(f"say why the log is the contract, not {contract!r}")
        return self.log_path.read_text()

    def log_tail(self, chars: int = 4000) -> str:
        """The log's last `chars` characters, for a failure message only."""
        return self.log_path.read_text()[-chars:]

    def shards(self) -> list[ShardProcess]:
        """The shard processes this launcher runs now (its children), by group and rank."""
        return shard_processes(self.process.pid)

    def wait_healthy(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mixserve launch exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5, context=self.ssl_context) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"mixserve launch not healthy after {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def servers_side_by_side(
    tmp_path_factory, flags: list[str], variants: dict[str, list[str]]
) -> "Iterator[dict[str, LaunchedServer]]":
    """Servers of `flags` plus each variant's own, started at once (they boot side by side), healthy when
    yielded by name, and stopped after: a module fixture yields from this."""
    started = {}
    for name, extra in variants.items():
        log = tmp_path_factory.mktemp(f"launch-{name}") / "server.log"
        started[name] = LaunchedServer([*flags, *extra], log, free_port())
    try:
        for server in started.values():
            server.wait_healthy()
        yield started
    finally:
        for server in started.values():
            server.stop()
