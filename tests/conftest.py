"""Shared fixtures: a demo checkpoint written once per test session, free ports, shard groups."""

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The Triton tests run kernels on CPU tensors in Triton's interpreter, which must be on before triton
# is first imported (it builds its library kernels then; torch._dynamo imports it). Kept out of the
# tests' subprocesses (subprocess_env) unless a test passes it.
os.environ.setdefault("TRITON_INTERPRET", "1")

from process_table import ShardProcess, shard_processes  # noqa: E402

from mixserve.shards.demo.checkpoint import TINY  # noqa: E402 - imports neither torch nor triton

# A JSON schema whose outputs end within ~40 tokens of the demo's (a short string, a bounded integer, a
# boolean): the grammar-constrained speculation tests decode it to the end.
SMALL_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, outside the kernel's ephemeral
    range: a server started with it binds it only after starting shards, whose own connections
    (gloo, gRPC) take ephemeral ports and once took the one picked for it."""
    ephemeral = _ephemeral_ports()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 65536)
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process of the tests: one torch thread, repo importable."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "proto"), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable
# The checkpoint of `interpreter_dir` (shards.demo.checkpoint.DemoConfig's fields).
INTERPRETER_CONFIG = TINY


def fresh_interpreter(code: str) -> str:
    """The last line `code` prints, run by `python -c` in a fresh interpreter (which must exit 0)."""
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def _is_python(argv) -> bool:
    program = argv if isinstance(argv, str | bytes | os.PathLike) else argv[0]
    return Path(os.fsdecode(program)).name.startswith("python") or os.fsdecode(program) == PYTHON


def pytest_collection_modifyitems(items) -> None:
    """A test that uses the `launch` fixture (directly or through a fixture of its own) starts a server:
    it is `slow` without saying so."""
    for item in items:
        if "launch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test that starts a Python process (a server, a shard group, ranks) must carry
    `@pytest.mark.slow`, so `-m "not slow"` stays the fast, in-process part of the suite: an unmarked
    one fails at its first such start, in its setup (fixtures included) or its body. Compilers and
    other tools may run anywhere."""
    if item.get_closest_marker("slow") is not None:
        return (yield)
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if _is_python(args):
            raise AssertionError(f"{item.nodeid} starts a Python process: mark it @pytest.mark.slow")
        original(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__ = original


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The default demo checkpoint, written by the real writer into a session temp dir."""
    from mixserve.shards.demo.checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "mixtral-demo")


@pytest.fixture(scope="session")
def interpreter_dir(tmp_path_factory) -> Path:
    """A demo checkpoint small enough for Triton's interpreter (~20-30 ms a kernel program): 2 layers,
    hidden 64, head dim 16, 2 KV heads, 4 experts of 64."""
    from mixserve.shards.demo.checkpoint import DemoConfig, write_demo_checkpoint

    out_dir = tmp_path_factory.mktemp("interpreter") / "mixtral-tiny"
    return write_demo_checkpoint(out_dir, DemoConfig(**INTERPRETER_CONFIG))


@pytest.fixture(scope="session")
def copier_dir(tmp_path_factory) -> Path:
    """The written copier (`mixserve bench copy-circuit`, seed 0): the demo's shapes, weights that continue
    a passage found in the prompt."""
    from mixserve.benchmarks.copy_circuit import circuit_state
    from mixserve.shards.demo.checkpoint import DemoConfig, write_checkpoint

    out_dir = tmp_path_factory.mktemp("copier")
    write_checkpoint(out_dir, DemoConfig(), circuit_state(DemoConfig()))
    return out_dir


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory):
    """The demo checkpoint's tokenizer files (a Mixtral-Instruct chat template), loaded as the router loads them."""
    from transformers import AutoTokenizer

    from mixserve.shards.demo.checkpoint import DemoConfig
    from mixserve.shards.demo.tokenizer import write_tokenizer_files

    out_dir = tmp_path_factory.mktemp("demo-tokenizer")
    config = DemoConfig()
    write_tokenizer_files(out_dir, config.vocab_size, config.max_position_embeddings)
    return AutoTokenizer.from_pretrained(out_dir)


def run_ranks(cmd: list[str], world_size: int, **env: str) -> None:
    """Run `cmd` as ranks 0..world_size-1 of one group (torchrun's variables, a free rendezvous port)
    and wait for all; fails with a rank's last output if any exits non-zero."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            cmd,
            env=subprocess_env(
                RANK=str(r), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    for r, p in enumerate(procs):
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"rank {r} failed:\n{output[-3000:]}"


def start_shards(model_dir: Path, socket_dir: Path, world_size: int) -> tuple[list[subprocess.Popen], list]:
    """`world_size` real `mixserve shard` processes on unix sockets in `socket_dir`, one group, with a
    connected gRPC stub for each (ready to answer); kill the processes when done."""
    import grpc

    from mixserve_pb import shard_pb2_grpc

    port = str(free_port())
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "mixserve.cli", "shard", "--model", str(model_dir), "--uds", str(socket_dir / f"s{r}")],
            env=subprocess_env(RANK=str(r), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in range(world_size)
    ]
    stubs = []
    for r in range(world_size):
        channel = grpc.insecure_channel(f"unix:{socket_dir / f's{r}'}")
        grpc.channel_ready_future(channel).result(timeout=120)
        stubs.append(shard_pb2_grpc.ShardServiceStub(channel))
    return procs, stubs


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
        self.url = f"http://127.0.0.1:{port}"
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
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
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


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Start `mixserve launch` with extra flags; every server started is stopped when its test module ends.
    (Each CPU server sizes its KV cache from what memory is left, up to 2 GiB, and fills it: kept to the
    session's end, the servers of ~25 modules took the machine's last free memory and the next one found
    no room for a KV cache.)"""
    started: list[LaunchedServer] = []

    def start(*args: str) -> LaunchedServer:
        log_path = tmp_path_factory.mktemp("launch") / "server.log"
        server = LaunchedServer(list(args), log_path, free_port())
        started.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in started:
        server.stop()


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


@pytest.fixture
def native():
    """The C kernels chosen for every op of the test (a machine with a C compiler must build them);
    `auto` after. Yields the chosen ops."""
    import torch

    from mixserve.shards import ops

    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the torch paths serve")
    cpu = torch.device("cpu")
    yield ops.select("native", cpu, torch.float32)
    ops.select("auto", cpu, torch.float32)


@pytest.fixture
def kernel_layers(monkeypatch) -> list[int]:
    """A list that gains an entry for every decoder layer the C decoder layer kernel runs, whether one by
    one (attention_block) or all of a step in one decoder_stack call."""
    from mixserve.shards.kernels import decoder_layer, decoder_stack

    ran: list[int] = []
    one, stack = decoder_layer.attention_block, decoder_stack.run
    monkeypatch.setattr(decoder_layer, "attention_block", lambda *a, **k: ran.append(1) or one(*a, **k))
    monkeypatch.setattr(decoder_stack, "run", lambda *a: ran.extend([1] * len(a[1].layers)) or stack(*a))
    return ran


@pytest.fixture
def decoder_layer_kernel(native):
    """`native`, skipping the test where the decoder layer kernel does not build."""
    if native.backends["decoder_layers"] != "native":
        pytest.skip("the decoder layer kernel does not build here")
    return native
