"""The serving half of `mixserve launch` (router/launcher.py checks the flags and the host first): start
the shard groups, load the tokenizer, build the engine over the groups' warm-up answers, open the HTTP and
gRPC fronts, supervise the groups (router/recovery.py) and drain on SIGINT/SIGTERM. Its imports (aiohttp,
grpc, the engine) are what the launcher's host check runs beside.
"""

import argparse
import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

from aiohttp import web

import mixserve
from mixserve.router.chat_template import ChatTemplate
from mixserve.router.generation import Limits
from mixserve.router.grpc_server import GrpcFront
from mixserve.router.host_check import HostPlan, group_visible_devices
from mixserve.router.params import RequestLimits
from mixserve.router.recovery import START_ERRORS, supervise_groups
from mixserve.router.replicas import build_replicas
from mixserve.router.scheduler import SchedulerConfig
from mixserve.router.server import ServerConfig, build_app
from mixserve.router.server_tls import ServerTLS
from mixserve.router.shard_processes import ShardSupervisor, prefill_tokens_per_step
from mixserve.router.shard_standby import HostCheck
from mixserve_pb import shard_pb2

log = logging.getLogger("mixserve.launcher")

# After the shard group fails for good the router keeps answering (503) this long before it exits,
# so clients and probes see why.
FAILURE_LINGER_S = 5.0


def cost_back_off(args: argparse.Namespace) -> bool:
    """Whether speculation weighs its cost: as --speculate-cost-back-off says, else with a draft model only.
    A draft's forwards are what can cost more than they gain (a 22 M draft ran at 0.90x plain on an H200);
    an n-gram step that finds nothing costs a plain step, and on the CPU demo the back-off's pauses and
    probes cost n-gram speculation 0-4 % where it paid (benchmarks/results/spec-cost-back-off)."""
    if args.speculate_cost_back_off is not None:
        return args.speculate_cost_back_off
    return bool(args.speculative_model)


def group_devices(plan: HostPlan | None, args: argparse.Namespace, groups: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each group the launcher starts: its own num_shard GPUs, so that the
    shards of every group find theirs at cuda:0.. (isolated: a group cannot touch another's GPUs, and
    each shard's device is cuda:<local rank> however it was started); None on CPU, with --device cuda:N,
    or for groups started elsewhere."""
    if plan is None or plan.device_type != "cuda" or args.device.startswith("cuda:"):
        return [None] * groups
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [group_visible_devices(visible, plan.device_count, plan.num_shard, g) for g in range(groups)]


def resolve_model(model: str | None) -> str:
    """The checkpoint dir of shards started elsewhere; with none given, the demo checkpoint (written
    once, in a child process so that the router process never imports torch)."""
    if model is not None:
        return model
    code = "from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint; print(ensure_demo_checkpoint())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not write the demo checkpoint:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


async def serve(
    args: argparse.Namespace,
    group_addresses: list[str | None],
    plan: HostPlan | None,
    socket_root: Path,
    stop: asyncio.Event,
    check: HostCheck | None = None,
    tls: ServerTLS | None = None,
) -> int:
    """Start (or reach) every shard group, the ones started beside the host `check` taken as they are,
    and serve (over `tls` where given) until `stop` is set (SIGINT, SIGTERM); `socket_root`: the private
    directory of the shards' sockets."""
    if args.log_prompts:
        # Off by default where its module sets it (router/output_processor.py, imported above).
        logging.getLogger("mixserve.prompts").setLevel(logging.INFO)
    model_dir = plan.model_dir if plan is not None else resolve_model(args.model)
    devices = group_devices(plan, args, len(group_addresses))
    # Loaded in a thread while the shards start (~0.5 s, transformers' import most of it); the fast
    # tokenizer class needs no torch.
    loading = asyncio.ensure_future(asyncio.to_thread(load_tokenizer, model_dir, args.chat_template))
    loading.add_done_callback(lambda done: done.cancelled() or done.exception())  # read where never awaited
    groups = [
        ShardSupervisor(args, model_dir, socket_root, i, a, d, check.take(i) if check and a is None else None)
        for i, (a, d) in enumerate(zip(group_addresses, devices, strict=True))
    ]
    try:
        return await _serve_with_shards(args, model_dir, loading, groups, stop, tls)
    finally:
        await asyncio.gather(*(shards.stop() for shards in groups))


def weights_kind(args: argparse.Namespace) -> str:
    """`random` for the built-in demo and `--load-format dummy` (their text means nothing), else `checkpoint`."""
    return "random" if args.model is None or getattr(args, "load_format", "auto") == "dummy" else "checkpoint"


def memory_fields(report: shard_pb2.MemoryReport) -> dict[str, int]:
    """A shard's MemoryReport as the plain dict /info shows."""
    return {field.name: getattr(report, field.name) for field in report.DESCRIPTOR.fields}


def kernels_fields(report: shard_pb2.KernelsReport) -> dict:
    """A shard's KernelsReport as the plain dict /info shows."""
    return {
        "backends": dict(sorted(report.backends.items())),
        "vector_floats": report.vector_floats,
        "bf16_dot_products": report.bf16_dot_products,
        "amx_tile_products": report.amx_tile_products,
    }


async def start_groups(
    groups: list[ShardSupervisor], stop: asyncio.Event
) -> list[tuple[shard_pb2.InfoResponse, shard_pb2.WarmupResponse]] | None:
    """Start every shard group at once; each one's Info and Warmup answers, or None when `stop` came
    first. Every start runs to its end before a failure is raised, so that no process escapes stop()."""
    results = await asyncio.gather(*(shards.start(stop) for shards in groups), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    if any(result is None for result in results):
        return None
    return results


def load_tokenizer(model_dir: str, chat_template: ChatTemplate | None = None):
    """The checkpoint's fast tokenizer (its tokenizer.json), with `chat_template` (--chat-template) in place
    of the checkpoint's own where one is given."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template.text
        source = chat_template.source
    else:
        source = "none" if tokenizer.chat_template is None else "checkpoint"
    log.info("event=chat_template source=%s", source)
    return tokenizer


async def _serve_with_shards(
    args, model_dir, loading: asyncio.Future, groups: list[ShardSupervisor], stop, tls: ServerTLS | None
) -> int:
    """Serve once the groups are warm and the tokenizer (`loading`) is in; 0 when stopped during start-up,
    1 where a group or the tokenizer failed to start, else what the supervision returns."""
    try:
        readies = await start_groups(groups, stop)
        if readies is None:
            log.info("event=stopped_during_startup")
            return 0
        try:
            tokenizer = await loading
        except Exception as e:
            log.error("event=startup_failed error=%s", f"the tokenizer of {model_dir} did not load: {e!r}")
            return 1
        info, _ = readies[0]
        max_total = args.max_total_tokens or info.max_position_embeddings
        max_input = args.max_input_tokens or max_total - 1
        limits = Limits(
            args.max_concurrent_requests, max_input, max_total, args.request_timeout, args.scheduling_policy
        )
        request_limits = RequestLimits(
            args.max_stop_sequences, args.max_top_n_tokens, args.max_choices, args.max_best_of
        )
    except START_ERRORS as e:
        log.error("event=startup_failed error=%s", e)
        return 1
    scheduled = []
    for shards, (group_info, warm) in zip(groups, readies, strict=True):
        log.info(
            "event=shards_ready num_shard=%d dtype=%s kv_cache_dtype=%s quantize=%s device=%s "
            "weight_bytes_per_shard=%d kv_blocks=%d block_size=%d warmup_ms=%d group=%d",
            len(shards.group.addresses),
            group_info.dtype,
            group_info.kv_cache_dtype,
            group_info.quantize or "none",
            group_info.device,
            group_info.weight_bytes,
            warm.num_blocks,
            warm.block_size,
            warm.warmup_ms,
            shards.group_id,
        )
        scheduler_config = SchedulerConfig(
            num_blocks=warm.num_blocks,
            block_size=warm.block_size,
            max_batch_prefill_tokens=prefill_tokens_per_step(args.max_batch_prefill_tokens, group_info.device),
            max_batch_total_tokens=args.max_batch_total_tokens,
            max_running_requests=args.max_batch_size,
            enable_prefix_caching=args.prefix_caching,
        )
        scheduled.append((shards.group, scheduler_config))
    eos = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    engine = build_replicas(
        scheduled,
        tokenizer,
        limits,
        eos,
        args.max_decode_steps,
        args.speculate,
        args.speculate_max_batch,
        args.stream_interval_ms,
        cost_back_off(args),
        args.speculate_constrained,
    )
    for shards, group_engine in zip(groups, engine.engines, strict=True):
        group_engine.retry_after_s = shards.retry_after_s if args.max_restarts else None
    config = ServerConfig(
        model_id=model_dir,
        api_key=args.api_key,
        cors_allow_origins=tuple(args.cors_allow_origin),
        max_body_bytes=args.max_body_bytes,
        read_timeout_s=args.read_timeout,
        limits=request_limits,
        num_shard=len(groups[0].group.addresses),
        dtype=info.dtype,
        kv_cache_dtype=info.kv_cache_dtype,
        quantize=info.quantize,
        weight_bytes_per_shard=info.weight_bytes,
        memory=memory_fields(readies[0][1].memory),
        kernels=kernels_fields(info.kernels),
        weights=weights_kind(args),
        version=mixserve.__version__,
        served_model_names=tuple(args.served_model_name),
        strict_model_name=args.strict_model_name,
        vllm_metrics=args.vllm_metrics,
        speculative_model=args.speculative_model,
        speculate_history_tokens=args.speculate_history_tokens,
        speculate_length=args.speculate_length,
        speculate_constrained=args.speculate_constrained,
    )
    # The keep-alive timer also runs from the moment a connection opens until its headers are complete,
    # so it is what bounds a client that never finishes them. After an answer that left the body unread
    # (408, 413, 401), the rest is read and dropped for at most as long again (aiohttp's default: 10 s).
    runner = web.AppRunner(
        build_app(engine, config),
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=args.read_timeout,
        lingering_time=min(args.read_timeout, 10.0),
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=None if tls is None else tls.context)
    # gRPC first: once HTTP /health answers, every front is up.
    grpc_front = GrpcFront(engine, config, args.host, args.grpc_port, tls) if args.grpc_port else None
    if grpc_front is not None:
        await grpc_front.start()
    await site.start()
    engine.start()
    scheme = "http" if tls is None else "https"
    log.info(
        "event=serving address=%s://%s:%d model=%s weights=%s", scheme, args.host, args.port, model_dir, config.weights
    )

    if await supervise_groups(engine, groups, grpc_front, stop, args.max_restarts):
        log.info("event=stopping graceful_timeout_s=%.0f in_flight=%d", args.graceful_timeout, len(engine.live))
        engine.retry_after_s = None
        await site.stop()
        grpc_stopped = asyncio.create_task(grpc_front.stop(args.graceful_timeout)) if grpc_front else None
        drained = await engine.drain(args.graceful_timeout)
        log.info("event=drained complete=%s", drained)
        if not drained:
            engine.fail(f"the server stopped; --graceful-timeout {args.graceful_timeout:.0f}s ran out")
        if grpc_stopped is not None:
            await grpc_stopped
        code = 0
    else:
        # Past --max-restarts: keep answering 503 with the reason a moment, so clients and probes see why.
        if grpc_front is not None:
            await grpc_front.health.enter_graceful_shutdown()
        await asyncio.sleep(FAILURE_LINGER_S)
        code = 1
    if grpc_front is not None:
        await grpc_front.stop(None)
    await engine.stop()
    await runner.cleanup()
    return code
