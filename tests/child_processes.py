"""Child processes of the tests: free ports, the environment a child runs in, ranks of one group and
real shard groups."""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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


def fresh_interpreter(code: str) -> str:
    """The last line `code` prints, run by `python -c` in a fresh interpreter (which must exit 0)."""
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


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
