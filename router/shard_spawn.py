"""Shard processes of the launcher: their flags and environment, started on unix sockets (or started
beside the host check, to start on its word: router/shard_standby.py), their output echoed, stopped.
Imports neither torch nor grpc: the launcher starts shards before its serving half has loaded.
"""

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("mixserve.launcher")

SHARD_LOG_LINES = 30


@dataclass(slots=True)
class ShardProcess:
    rank: int
    address: str
    process: asyncio.subprocess.Process
    last_lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SHARD_LOG_LINES))
    output: asyncio.Task | None = None  # echoes the shard's output until it ends
    started: float = field(default_factory=time.monotonic)

    def describe_exit(self) -> str:
        tail = "\n".join(self.last_lines) or "(no output)"
        return f"shard {self.rank} exited with code {self.process.returncode}; its last lines:\n{tail}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_environment(num_shard: int, rank: int, master_port: int, visible_devices: str | None) -> dict[str, str]:
    """The environment of one shard the launcher starts: torchrun's variables (LOCAL_RANK is the rank:
    one host), and with `visible_devices` its group's GPUs, so that rank r uses `cuda:r` among them."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), OMP_NUM_THREADS="1")
    env.update(WORLD_SIZE=str(num_shard), RANK=str(rank), LOCAL_RANK=str(rank), PYTHONUNBUFFERED="1")
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    return env


def group_socket_dir(socket_root: Path, group_id: int, start: int) -> Path:
    """Where the sockets of start `start` of group `group_id` go (fresh on every start)."""
    return socket_root / (f"group-{start}" if group_id == 0 else f"group{group_id}-{start}")


def shard_flags(args: argparse.Namespace, model_dir: str | None, path: Path, rank: int) -> list[str]:
    """The `mixserve shard` flags of rank `rank` of a group of `args.num_shard` on the unix socket `path`
    (no --model for None: the shard's own default, the demo checkpoint)."""
    flags = ["--rank", str(rank), "--world-size", str(args.num_shard)]
    flags += ["--model", model_dir] if model_dir is not None else []
    flags += ["--uds", str(path), "--dtype", args.dtype, "--kv-cache-dtype", args.kv_cache_dtype]
    flags += ["--device", args.device]
    flags += ["--block-size", str(args.block_size), "--max-kv-blocks", str(args.max_kv_blocks)]
    if args.quantize:
        flags += ["--quantize", args.quantize]
    flags += ["--moe-parallel", args.moe_parallel, "--kernels", args.kernels, "--load-format", args.load_format]
    flags += ["--cpu-tiles", args.cpu_tiles, "--warmup-timings", args.warmup_timings]
    flags += ["--cuda-graphs", args.cuda_graphs, "--max-graph-batch", str(args.max_graph_batch)]
    if args.speculative_model:
        flags += ["--speculative-model", args.speculative_model]
    if args.speculate_history_tokens:
        flags += ["--speculate-history-tokens", str(args.speculate_history_tokens)]
    flags += ["--speculate-length", args.speculate_length]
    return flags


async def start_shards(
    args: argparse.Namespace,
    model_dir: str | None,
    socket_dir: Path,
    group_id: int = 0,
    visible_devices: str | None = None,
    standby: bool = False,
) -> list[ShardProcess]:
    """Start the group's `args.num_shard` shard processes on unix sockets in `socket_dir`;
    `visible_devices`: the group's GPUs (CUDA_VISIBLE_DEVICES), None to leave the variable as it is.
    With `standby`, started before the host check answered (router/shard_standby.py): they wait for
    `go_shards`, which echoes their output from then on, or for `stop_shards` (SIGKILL: they hold nothing
    yet)."""
    master_port = _free_port()
    shards = []
    for rank in range(args.num_shard):
        path = socket_dir / f"shard-{rank}.sock"
        flags = shard_flags(args, model_dir, path, rank) + (["--standby"] if standby else [])
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mixserve.cli",
            "shard",
            *flags,
            env=shard_environment(args.num_shard, rank, master_port, visible_devices),
            stdin=asyncio.subprocess.PIPE if standby else None,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        shard = ShardProcess(rank, f"unix:{path}", process)
        shards.append(shard)
        if not standby:
            _started(shard, group_id, visible_devices)
    return shards


async def go_shards(shards: list[ShardProcess], group_id: int) -> None:
    """Tell standby shards (their host check passed with the plan they were started for) to start. One
    that has died meanwhile is left to the start-up's watch, which reports its exit and last lines."""
    for shard in shards:
        stdin = shard.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"go": True}).encode() + b"\n")
            await stdin.drain()
            stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        _started(shard, group_id, None)


def _started(shard: ShardProcess, group_id: int, visible_devices: str | None) -> None:
    log.info(
        "event=shard_started rank=%d pid=%d address=%s group=%d gpus=%s standby=%s",
        shard.rank,
        shard.process.pid,
        shard.address,
        group_id,
        visible_devices or "-",
        "yes" if shard.process.stdin is not None else "no",
    )
    shard.output = asyncio.create_task(_pump_output(shard))


async def _pump_output(shard: ShardProcess) -> None:
    """Echo a shard's log lines to ours and keep the last few for error messages."""
    assert shard.process.stdout is not None
    async for raw in shard.process.stdout:
        line = raw.decode(errors="replace").rstrip()
        shard.last_lines.append(line)
        print(line, file=sys.stderr, flush=True)


def signal_child(process: asyncio.subprocess.Process, sig: int) -> None:
    """Send `sig` to a child the loop watches. Not through process.send_signal: its Popen polls the child
    first, and a child that has just exited is reaped by that poll before asyncio's child watcher reaps it,
    which then logs "Unknown child process pid" and reports exit code 255 (a shard 0 that refused a flag,
    killed with the other early shards, did). A signal to an exited, unreaped child is a no-op."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)


async def stop_shards(shards: list[ShardProcess], timeout_s: float = 10.0, kill: bool = False) -> None:
    """Stop the shard processes and wait for them: SIGTERM, or SIGKILL with `kill` or past `timeout_s`."""
    for shard in shards:
        if shard.process.returncode is None:
            if kill:
                signal_child(shard.process, signal.SIGKILL)
                continue
            signal_child(shard.process, signal.SIGTERM)
            # A stopped (SIGSTOP) shard acts on SIGTERM only once continued.
            signal_child(shard.process, signal.SIGCONT)
    for shard in shards:
        try:
            await asyncio.wait_for(shard.process.wait(), timeout_s)
        except TimeoutError:
            signal_child(shard.process, signal.SIGKILL)
            await shard.process.wait()
    # Read each output pipe to its end while the loop runs: a pipe left open is closed by the garbage
    # collector after asyncio.run closed the loop ("RuntimeError: Event loop is closed" at exit). A standby
    # shard stopped before its start has no echo reading it.
    outputs = [s.output or asyncio.ensure_future(s.process.communicate()) for s in shards]
    if outputs:
        await asyncio.wait(outputs, timeout=timeout_s)
