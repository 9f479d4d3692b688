"""Shared fixtures: demo checkpoints written once per test session, launched servers, the C kernels; the
guard that keeps child processes out of the fast tests. Helpers the tests import live in their own
modules (child_processes, launched_server, json_schemas), not here."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# The Triton tests run kernels on CPU tensors in Triton's interpreter, which must be on before triton
# is first imported (it builds its library kernels then; torch._dynamo imports it). Kept out of the
# tests' subprocesses (subprocess_env) unless a test passes it.
os.environ.setdefault("TRITON_INTERPRET", "1")

from child_processes import PYTHON, free_port  # noqa: E402
from launched_server import LaunchedServer  # noqa: E402
from mixserve.shards.demo.checkpoint import TINY  # noqa: E402 - imports neither torch nor triton


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
    return write_demo_checkpoint(out_dir, DemoConfig(**TINY))


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


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files): the TCP shards' TLS
    (tests/test_tcp_shards.py) and the router's (tests/test_server_tls.py)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    out = tmp_path_factory.mktemp("tls")
    cert, key = out / "cert.pem", out / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


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
