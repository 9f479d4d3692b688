"""`mixserve launch`: start the shards, wait for them, warm them up, and serve the router.

The shards are child processes on unix sockets in a private temp dir. The launcher watches them:
if one dies, every in-flight request ends with an error, /health answers 503, and the launcher
stops the rest and exits non-zero. SIGINT/SIGTERM stop accepting, let in-flight streams finish up
to --graceful-timeout, stop the shards and exit 0. With --grpc-port, the public gRPC service runs
on the same loop and drains the same way.
"""

import argparse
import asyncio
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

import mixserve
from router.engine import Engine, Limits
from router.errors import RouterError
from router.grpc_server import GrpcFront
from router.scheduler import SchedulerConfig
from router.server import ServerConfig, build_app
from router.shard_client import ShardGroup
from shards.quant.config import QUANTIZE_MODES

log = logging.getLogger("mixserve.launcher")

# After a shard dies the router keeps answering (503) this long before it exits, so clients and
# probes see why.
FAILURE_LINGER_S = 5.0
SHARD_LOG_LINES = 30


@dataclass(slots=True)
class ShardProcess:
    rank: int
    address: str
    process: asyncio.subprocess.Process
    last_lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SHARD_LOG_LINES))

    def describe_exit(self) -> str:
        tail = "\n".join(self.last_lines) or "(no output)"
        return f"shard {self.rank} exited with code {self.process.returncode}; its last lines:\n{tail}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--model", help="checkpoint directory (default: the built-in demo model, cached)")
    parser.add_argument("--num-shard", type=int, default=4, help="tensor-parallel shard processes")
    parser.add_argument("--host", default="127.0.0.1", help="address the router binds")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=0, help="public gRPC generation service port (0: off)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--device", default="auto", help="shard device: auto, cpu or cuda")
    parser.add_argument(
        "--quantize", choices=QUANTIZE_MODES, help="bitsandbytes LLM.int8 or 4-bit shards (default: not quantized)"
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV cache tokens per block")
    parser.add_argument("--max-kv-blocks", type=int, default=0, help="cap on KV cache blocks (0: from memory)")
    parser.add_argument("--max-concurrent-requests", type=int, default=128, help="queued + running (429 past it)")
    parser.add_argument("--max-input-tokens", type=int, default=None, help="default: max-total-tokens - 1")
    parser.add_argument("--max-total-tokens", type=int, default=None, help="prompt + new tokens (default: model max)")
    parser.add_argument("--max-batch-prefill-tokens", type=int, default=4096, help="prompt tokens per step")
    parser.add_argument("--max-batch-total-tokens", type=int, default=None, help="KV tokens the batch may hold")
    parser.add_argument("--max-batch-size", type=int, default=256, help="sequences running at once")
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of prompt prefixes seen before",
    )
    parser.add_argument("--api-key", default=env.get("MIXSERVE_API_KEY"), help="default: $MIXSERVE_API_KEY")
    parser.add_argument("--max-body-bytes", type=int, default=2 << 20, help="largest request body (413 past it)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to let streams finish on stop")
    parser.add_argument("--shard-timeout", type=float, default=300.0, help="seconds to wait for shards to start")
    parser.add_argument("--step-timeout", type=float, default=60.0, help="seconds before a step counts as failed")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def resolve_model(model: str | None) -> str:
    """The checkpoint dir; with none given, the demo checkpoint (written once, in a child process so
    that the router process never imports torch)."""
    if model is not None:
        if not (Path(model) / "config.json").exists():
            raise SystemExit(f"--model {model}: no config.json there")
        return model
    code = "from shards.demo.checkpoint import ensure_demo_checkpoint; print(ensure_demo_checkpoint())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not write the demo checkpoint:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_shards(args: argparse.Namespace, model_dir: str, socket_dir: Path) -> list[ShardProcess]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    env.update(WORLD_SIZE=str(args.num_shard), PYTHONUNBUFFERED="1")
    shards = []
    for rank in range(args.num_shard):
        path = socket_dir / f"shard-{rank}.sock"
        cmd = [sys.executable, "-m", "mixserve.cli", "shard", "--rank", str(rank), "--world-size", str(args.num_shard)]
        cmd += ["--model", model_dir, "--uds", str(path), "--dtype", args.dtype, "--device", args.device]
        cmd += ["--block-size", str(args.block_size), "--max-kv-blocks", str(args.max_kv_blocks)]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        process = await asyncio.create_subprocess_exec(
            *cmd, env=dict(env, RANK=str(rank)), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        shard = ShardProcess(rank, f"unix:{path}", process)
        log.info("event=shard_started rank=%d pid=%d address=%s", rank, process.pid, shard.address)
        asyncio.create_task(_pump_output(shard))
        shards.append(shard)
    return shards


async def _pump_output(shard: ShardProcess) -> None:
    """Echo a shard's log lines to ours and keep the last few for error messages."""
    assert shard.process.stdout is not None
    async for raw in shard.process.stdout:
        line = raw.decode(errors="replace").rstrip()
        shard.last_lines.append(line)
        print(line, file=sys.stderr, flush=True)


async def wait_until_ready(group: ShardGroup, shards: list[ShardProcess], timeout_s: float) -> None:
    """Wait for every shard's socket to answer; fail naming the shard that exited or never answered."""
    ready = asyncio.create_task(group.wait_ready(timeout_s))
    exits = [asyncio.create_task(s.process.wait()) for s in shards]
    done, _ = await asyncio.wait([ready, *exits], return_when=asyncio.FIRST_COMPLETED)
    for shard, task in zip(shards, exits, strict=True):
        if task in done:
            ready.cancel()
            raise RuntimeError(shard.describe_exit())
    for task in exits:
        task.cancel()
    try:
        ready.result()
    except TimeoutError:
        silent = [s for s in shards if not os.path.exists(s.address.removeprefix("unix:"))]
        which = silent[0] if silent else shards[0]
        tail = "\n".join(which.last_lines)
        raise RuntimeError(
            f"shard {which.rank} did not answer within {timeout_s:.0f}s; its last lines:\n{tail}"
        ) from None


async def stop_shards(shards: list[ShardProcess], timeout_s: float = 10.0) -> None:
    for shard in shards:
        if shard.process.returncode is None:
            shard.process.terminate()
    for shard in shards:
        try:
            await asyncio.wait_for(shard.process.wait(), timeout_s)
        except TimeoutError:
            shard.process.kill()
            await shard.process.wait()


async def serve(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model)
    # The fast tokenizer class loads tokenizer.json and the chat template without importing torch.
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="mixserve-") as tmp:
        socket_dir = Path(tmp)
        os.chmod(socket_dir, 0o700)
        shards = await start_shards(args, model_dir, socket_dir)
        group = ShardGroup([s.address for s in shards], step_timeout_s=args.step_timeout)
        try:
            return await _serve_with_shards(args, model_dir, tokenizer, group, shards)
        finally:
            await group.close()
            await stop_shards(shards)


async def _serve_with_shards(args, model_dir, tokenizer, group: ShardGroup, shards: list[ShardProcess]) -> int:
    try:
        await wait_until_ready(group, shards, args.shard_timeout)
        info = await group.info()
        max_total = args.max_total_tokens or info.max_position_embeddings
        max_input = args.max_input_tokens or max_total - 1
        limits = Limits(args.max_concurrent_requests, max_input, max_total)
        warm = await group.warmup(
            args.max_batch_prefill_tokens + args.max_batch_size, args.max_batch_size, args.max_kv_blocks
        )
    except (RuntimeError, RouterError, ValueError) as e:
        log.error("event=startup_failed error=%s", e)
        return 1
    log.info(
        "event=shards_ready num_shard=%d dtype=%s quantize=%s device=%s weight_bytes_per_shard=%d kv_blocks=%d "
        "block_size=%d warmup_ms=%d",
        len(shards),
        info.dtype,
        info.quantize or "none",
        info.device,
        info.weight_bytes,
        warm.num_blocks,
        warm.block_size,
        warm.warmup_ms,
    )
    scheduler_config = SchedulerConfig(
        num_blocks=warm.num_blocks,
        block_size=warm.block_size,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_running_requests=args.max_batch_size,
        enable_prefix_caching=args.prefix_caching,
    )
    eos = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    engine = Engine(group, tokenizer, scheduler_config, limits, eos)
    config = ServerConfig(
        model_id=model_dir,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        num_shard=len(shards),
        dtype=info.dtype,
        version=mixserve.__version__,
    )
    runner = web.AppRunner(build_app(engine, config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    # gRPC first: once HTTP /health answers, every front is up.
    grpc_front = GrpcFront(engine, config, args.host, args.grpc_port) if args.grpc_port else None
    if grpc_front is not None:
        await grpc_front.start()
    await site.start()
    engine.start()
    log.info("event=serving address=http://%s:%d model=%s", args.host, args.port, model_dir)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exits = {asyncio.create_task(s.process.wait()): s for s in shards}
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
    dead = [exits[t] for t in done if t in exits]
    if dead:
        reason = dead[0].describe_exit()
        log.error("event=shard_died %s", reason.replace("\n", " | "))
        engine.fail(f"shard {dead[0].rank} exited with code {dead[0].process.returncode}")
        if grpc_front is not None:
            await grpc_front.health.enter_graceful_shutdown()
        await stop_shards(shards)
        await asyncio.sleep(FAILURE_LINGER_S)
        code = 1
    else:
        log.info("event=stopping graceful_timeout_s=%.0f in_flight=%d", args.graceful_timeout, len(engine.live))
        await site.stop()
        grpc_stopped = asyncio.create_task(grpc_front.stop(args.graceful_timeout)) if grpc_front else None
        drained = await engine.drain(args.graceful_timeout)
        log.info("event=drained complete=%s", drained)
        if not drained:
            engine.fail(f"the server stopped; --graceful-timeout {args.graceful_timeout:.0f}s ran out")
        if grpc_stopped is not None:
            await grpc_stopped
        code = 0
    for task in [stopping, *exits]:
        task.cancel()
    if grpc_front is not None:
        await grpc_front.stop(None)
    await engine.stop()
    await runner.cleanup()
    return code


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s router %(levelname)s %(message)s"
    )
    return asyncio.run(serve(args))
