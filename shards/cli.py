"""`mixserve shard`: start one tensor-parallel shard process serving the ShardService over gRPC.

The device is `cuda:<LOCAL_RANK>` on a CUDA host (shards/devices.py).
Rank, world size and the rendezvous come from the flags, else from torchrun's variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so `torchrun ... -m mixserve.cli shard --port P`
starts a group, one host or several. Kept apart from the ShardService (shards/server.py), which
tests and other processes build around a runner of their own.
"""

import argparse
import logging
import os
from concurrent import futures
from pathlib import Path

import grpc
import torch

from mixserve.shards import decode_graph, huge_pages, ops, proposal_length, warmup_timings
from mixserve.shards.config import DTYPES, MOE_PARALLEL_MODES, ModelConfig, ParallelConfig
from mixserve.shards.devices import (
    DEVICE_CHOICES,
    KV_CACHE_DTYPES,
    DeviceUnavailable,
    cpu_has_bf16,
    make_current,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from mixserve.shards.distributed import init_process_group, tensor_parallel_group
from mixserve.shards.draft import check_draft, load_draft
from mixserve.shards.grammar import GrammarMatchers, load_tokenizer
from mixserve.shards.kernels import native
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.listen import ListenConfig, ListenError
from mixserve.shards.listen import add_arguments as add_listen_arguments
from mixserve.shards.loader import LOAD_FORMATS, load_model
from mixserve.shards.quant.config import QUANTIZE_MODES, QuantizationConfig
from mixserve.shards.quant.probe import QuantizationUnavailable, check_supported
from mixserve.shards.runner import ModelRunner
from mixserve.shards.server import ShardServicer
from mixserve.shards.standby import wait_for_go
from mixserve_pb import shard_pb2_grpc

log = logging.getLogger("mixserve.shard")

# Worker threads computing grammar masks on a GPU shard (llguidance releases the GIL while it works).
GPU_GRAMMAR_THREADS = 2


def grammar_matchers(model_dir: str, model, device: torch.device) -> GrammarMatchers | None:
    """The constrained-decoding matchers over the checkpoint's tokenizer, or None (logged) when it has none
    that llguidance reads; the shard then refuses steps that carry a grammar. On a GPU the masks are computed
    in background threads while the host waits on the device."""
    vocab_size = model.config.vocab_size
    try:
        tokenizer = load_tokenizer(model_dir, vocab_size)
        return GrammarMatchers(tokenizer, vocab_size, GPU_GRAMMAR_THREADS if device.type == "cuda" else 0)
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("event=grammars_unavailable model=%s error=%r", model_dir, str(e))
        return None


def local_rank(rank: int) -> int:
    """This shard's index among the shards of its host: LOCAL_RANK (the launcher and torchrun set it),
    else its rank."""
    return int(os.environ.get("LOCAL_RANK", rank))


def is_demo_checkpoint(model_dir: str) -> bool:
    """Whether `model_dir` is the built-in demo checkpoint (random weights: its text means nothing)."""
    from mixserve.shards.demo.checkpoint import demo_checkpoint_dir

    return Path(model_dir).resolve() == demo_checkpoint_dir().resolve()


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `mixserve shard` flags."""
    env = os.environ
    parser.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    parser.add_argument("--rank", type=int, default=int(env.get("RANK", 0)), help="default: $RANK or 0")
    parser.add_argument(
        "--world-size", type=int, default=int(env.get("WORLD_SIZE", 1)), help="default: $WORLD_SIZE or 1"
    )
    add_listen_arguments(parser)
    parser.add_argument(
        "--dtype",
        choices=[*DTYPES, "auto"],
        default="auto",
        help="auto: bfloat16 on CPUs with avx512_bf16 (float32 on other CPUs), bfloat16 on CUDA (float16 on GPUs "
        "without it)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=[*KV_CACHE_DTYPES, "auto"],
        default="auto",
        help="the KV cache's dtype; auto: the model's (--dtype). On CPU bfloat16 under a float32 model halves "
        "the cache's bytes; on a GPU only the model's dtype",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help=f"{DEVICE_CHOICES}; cuda is cuda:$LOCAL_RANK (else cuda:RANK); auto is cuda where torch sees a GPU",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="hold attention and experts with bitsandbytes: LLM.int8 (bitsandbytes) or 4-bit; or every linear "
        "weight as weight-only int8 on the CPU (int8-wo) (default: not quantized)",
    )
    parser.add_argument(
        "--moe-parallel",
        choices=MOE_PARALLEL_MODES,
        default="tp",
        help="tp: every rank holds a slice of every expert; ep: each rank holds num_experts / world_size whole experts",
    )
    parser.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default="auto",
        help="auto: the safetensors checkpoint; dummy: random weights of its shapes, made on the device "
        "(only config.json is read)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the dummy weights (--load-format dummy)")
    parser.add_argument(
        "--speculative-model",
        help="checkpoint directory of a draft model with the model's vocabulary, held whole on every shard, "
        "proposing the tokens of the router's drafting steps (default: none)",
    )
    parser.add_argument(
        "--speculate-history-tokens",
        type=int,
        default=0,
        help="n-gram proposals also look up the tokens of recently finished sequences, up to this many (0: off)",
    )
    parser.add_argument(
        "--speculate-length",
        choices=proposal_length.MODES,
        default="adaptive",
        help="adaptive: each sequence's n-gram proposals per step follow what its verifications kept (up to what "
        "the step allows); fixed: as many as the step allows",
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV cache token slots per block")
    parser.add_argument("--max-kv-blocks", type=int, default=0, help="cap on KV cache blocks (0: size from memory)")
    parser.add_argument(
        "--collectives",
        choices=["auto", "shm", "torch"],
        default="auto",
        help="auto: shared-memory all-reduce between CPU shards of one host, else torch.distributed",
    )
    parser.add_argument(
        "--kernels",
        choices=ops.MODES,
        default="auto",
        help=ops.MODE_HELP,
    )
    parser.add_argument("--cpu-tiles", choices=native.TILE_MODES, default="auto", help=native.TILE_HELP)
    parser.add_argument(
        "--warmup-timings", choices=warmup_timings.MODES, default="stored", help=warmup_timings.MODE_HELP
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=decode_graph.MODES,
        default="auto",
        help="decode steps replayed as CUDA graphs, one per batch-size bucket: on CUDA without --quantize (auto), "
        "never (off), or their static buffers without capture on any device (eager)",
    )
    parser.add_argument(
        "--max-graph-batch",
        type=_non_negative_int,
        default=0,
        help="most tokens a step replayed from a CUDA graph has (0: the warm-up's max batch size, at least 32)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (one per shard is fastest)")
    parser.add_argument("--master-addr", help="rendezvous address (default: $MASTER_ADDR or 127.0.0.1)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: $MASTER_PORT or 29500)")
    parser.add_argument(
        "--standby",
        action="store_true",
        help="started by `mixserve launch` before its host check answered: import, then wait for its word on "
        "stdin (shards/standby.py)",
    )


def run(args: argparse.Namespace) -> int:
    """Start the shard the parsed flags describe and serve until terminated; 2 when it refuses to start
    (0 for a standby the launcher did not need)."""
    if args.standby and not wait_for_go():
        return 0
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard{args.rank} %(levelname)s %(message)s")
    if args.master_addr:
        os.environ["MASTER_ADDR"] = args.master_addr
    if args.master_port:
        os.environ["MASTER_PORT"] = str(args.master_port)
    torch.set_num_threads(args.threads)
    try:
        listen = ListenConfig.from_args(args, int(os.environ.get("LOCAL_RANK", 0)))
    except ListenError as e:
        log.error("event=bad_listen error=%r", str(e))
        return 2
    parallel = ParallelConfig(args.rank, args.world_size, args.moe_parallel)
    try:
        device = resolve_device(args.device, local_rank(args.rank))
        dtype = resolve_dtype(args.dtype, device)
        kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype, device)
        if args.kernels == "triton" and kv_dtype is not dtype:
            raise DeviceUnavailable(f"--kv-cache-dtype {args.kv_cache_dtype}: Triton's kernels read the model's dtype")
    except DeviceUnavailable as e:
        log.error("event=device_unavailable error=%r", str(e))
        return 2
    log.info(
        "event=dtype rank=%d dtype=%s requested=%s kv_cache_dtype=%s cpu_avx512_bf16=%s",
        parallel.rank,
        str(dtype).removeprefix("torch."),
        args.dtype,
        str(kv_dtype).removeprefix("torch."),
        cpu_has_bf16(),
    )
    # Before anything touches CUDA: the main thread loads the model, the model thread runs it.
    make_current(device)
    quantization = QuantizationConfig(args.quantize) if args.quantize else None
    model_dir = args.model
    if model_dir is None:
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    if parallel.rank == 0 and is_demo_checkpoint(model_dir):
        log.warning(
            "event=demo_model weights=random model=%s: the built-in demo has random weights, so its text is "
            "meaningless; pass --model DIR to serve a checkpoint",
            model_dir,
        )
    try:
        config = ModelConfig.from_pretrained(model_dir)
        parallel.check(config)
        if args.speculative_model:
            check_draft(args.speculative_model, config)
    except ValueError as e:
        log.error("event=bad_config error=%r", str(e))
        return 2
    if quantization is not None:
        # Before the rendezvous: every rank fails alike, at once, instead of mid-load or mid-request.
        try:
            check_supported(quantization, dtype, device)
        except QuantizationUnavailable as e:
            log.error("event=quantization_unavailable error=%r", str(e))
            return 2
    try:
        # Once per shard, before the model is built; the C kernels are built here, not on the first request.
        ops.select(args.kernels, device, dtype, amx_tiles=args.cpu_tiles == "auto")
    except KernelUnavailable as e:
        log.error("event=kernel_unavailable error=%r", str(e))
        return 2
    init_process_group(parallel, device)
    group = tensor_parallel_group(parallel, device, args.collectives)
    model = load_model(model_dir, parallel, group, dtype, device, quantization, args.load_format, args.seed)
    if device.type == "cpu":
        log.info(
            "event=huge_pages rank=%d mode=%s requested=%d anon_huge_bytes=%s",
            parallel.rank,
            huge_pages.system_mode(),
            int(huge_pages.requested()),
            huge_pages.huge_page_bytes(),
        )
    grammars = grammar_matchers(model_dir, model, device)
    draft = None
    if args.speculative_model:
        draft = load_draft(
            args.speculative_model,
            config,
            group,
            dtype,
            device,
            args.block_size,
            args.cuda_graphs,
            args.load_format,
            args.seed,
        )
    runner = ModelRunner(
        model,
        parallel,
        group,
        device,
        dtype,
        args.block_size,
        args.cuda_graphs,
        args.max_graph_batch,
        grammars,
        draft,
        args.speculate_history_tokens,
        args.speculate_length == "adaptive",
        kv_dtype=kv_dtype,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=listen.interceptors(),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    shard_pb2_grpc.add_ShardServiceServicer_to_server(
        ShardServicer(
            runner,
            model_dir,
            args.max_kv_blocks,
            args.quantize or "",
            warmup_timings=warmup_timings.TimingsStore.from_mode(args.warmup_timings),
        ),
        server,
    )
    try:
        address = listen.bind(server)
    except ListenError as e:
        log.error("event=bad_listen error=%r", str(e))
        return 2
    log.info(
        "event=serving rank=%d world_size=%d moe_parallel=%s address=%s %s device=%s",
        args.rank,
        args.world_size,
        args.moe_parallel,
        address,
        listen.describe(),
        device,
    )
    server.wait_for_termination()
    return 0
