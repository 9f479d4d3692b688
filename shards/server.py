"""`mixserve shard`: one tensor-parallel shard serving the ShardService over gRPC.

Every shard of a group gets the same calls from the router; the model calls (Warmup, Step,
DecodeSteps, Release, Clear) run one at a time under a lock, while Info, Health and Interrupt
answer at any time.
Rank, world size and the rendezvous come from the flags, else from torchrun's variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so `torchrun ... -m mixserve.cli shard --port P`
starts a group, one host or several.
"""

import argparse
import logging
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from mixserve_pb import shard_pb2, shard_pb2_grpc
from shards.config import DTYPES, MOE_PARALLEL_MODES, ModelConfig, ParallelConfig
from shards.distributed import init_process_group, tensor_parallel_group
from shards.grammar import GrammarMatchers, load_tokenizer
from shards.kernels import native as native_kernels
from shards.kernels.native import KernelUnavailable
from shards.listen import ListenConfig, ListenError
from shards.listen import add_arguments as add_listen_arguments
from shards.loader import load_model, weight_bytes
from shards.multi_step import decode_steps
from shards.quant.config import QUANTIZE_MODES, QuantizationConfig
from shards.quant.probe import QuantizationUnavailable, check_supported
from shards.runner import InvalidStep, ModelRunner, OutOfCapacity, SequenceResult, SequenceStep
from shards.sampling import SamplingParams

log = logging.getLogger("mixserve.shard")

# On CPU the shards of one host share its memory: each takes this share of what is available,
# up to a cap, unless --max-kv-blocks says otherwise.
CPU_KV_MEMORY_FRACTION = 0.25
CPU_KV_MEMORY_CAP = 2 << 30
# Worker threads computing grammar masks on a GPU shard (llguidance releases the GIL while it works).
GPU_GRAMMAR_THREADS = 2


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    """The gRPC face of one ModelRunner."""

    def __init__(self, runner: ModelRunner, model_dir: str, max_kv_blocks: int, quantize: str = "") -> None:
        self.runner = runner
        self.model_dir = model_dir
        self.max_kv_blocks = max_kv_blocks
        self.quantize = quantize
        self.lock = threading.Lock()
        self.interrupted_run_id = 0

    def Info(self, request, context):
        r = self.runner
        c = r.config
        cache = r.kv_cache
        return shard_pb2.InfoResponse(
            model_type="mixtral",
            model_path=self.model_dir,
            rank=r.parallel.rank,
            world_size=r.parallel.world_size,
            dtype=str(r.dtype).removeprefix("torch."),
            device=str(r.device),
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            num_experts=c.num_local_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            max_position_embeddings=c.max_position_embeddings,
            block_size=r.block_size,
            num_blocks=cache.num_blocks if cache else 0,
            weight_bytes=weight_bytes(r.model),
            quantize=self.quantize,
            kv_cache_bytes=cache.nbytes if cache else 0,
        )

    def Health(self, request, context):
        return shard_pb2.HealthResponse(ready=self.runner.kv_cache is not None)

    def Warmup(self, request, context):
        started = time.perf_counter()
        cap = request.max_blocks or self.max_kv_blocks
        if request.max_blocks and self.max_kv_blocks:
            cap = min(request.max_blocks, self.max_kv_blocks)
        with self.lock:
            num_blocks = self.runner.warmup(
                request.max_batch_tokens or 1, request.max_batch_size or 1, cap, kv_budget_bytes(self.runner)
            )
        ms = int((time.perf_counter() - started) * 1000)
        log.info(
            "event=warmup rank=%d num_blocks=%d block_size=%d kv_bytes=%d ms=%d",
            self.runner.parallel.rank,
            num_blocks,
            self.runner.block_size,
            self.runner.kv_cache.nbytes,
            ms,
        )
        return shard_pb2.WarmupResponse(num_blocks=num_blocks, block_size=self.runner.block_size, warmup_ms=ms)

    def Step(self, request, context):
        started = time.perf_counter_ns()
        try:
            steps = [_step_from_proto(s) for s in request.sequences]
            with self.lock:
                self.runner.release(list(request.release_seq_ids))
                results = self.runner.step(steps)
        except OutOfCapacity as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (InvalidStep, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return _step_response(results, started)

    def DecodeSteps(self, request, context):
        started = time.perf_counter_ns()
        try:
            steps = [_step_from_proto(s) for s in request.sequences]
            with self.lock:
                self.runner.release(list(request.release_seq_ids))
                run_id = request.run_id

                def agree_to_stop() -> bool:
                    return self.runner.group.any_rank(self.interrupted_run_id >= run_id)

                # Only rank 0's answers reach clients: the other ranks send theirs once, at the end,
                # which spares both sides a message per step (the router still reads every stream,
                # to see a rank fail).
                every_step = self.runner.parallel.rank == 0
                count, results = 0, []
                for count, results in enumerate(
                    decode_steps(self.runner, steps, request.num_steps, agree_to_stop), start=1
                ):
                    if every_step:
                        yield _step_response(results, started, count)
                        started = time.perf_counter_ns()
                if not every_step:
                    yield _step_response(results, started, count)
        except OutOfCapacity as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (InvalidStep, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Interrupt(self, request, context):
        # No lock: the run it stops holds it. Run ids only grow, so an interrupt that overtakes its
        # run's start still stops that run.
        self.interrupted_run_id = max(self.interrupted_run_id, request.run_id)
        return shard_pb2.InterruptResponse()

    def Release(self, request, context):
        with self.lock:
            self.runner.release(list(request.seq_ids))
        return shard_pb2.ReleaseResponse()

    def Clear(self, request, context):
        with self.lock:
            self.runner.clear()
        return shard_pb2.ClearResponse()


def _step_response(results: list[SequenceResult], started_ns: int, steps: int = 0) -> shard_pb2.StepResponse:
    return shard_pb2.StepResponse(
        results=[
            shard_pb2.SequenceResult(
                seq_id=r.seq_id,
                sampled=True,
                token_id=r.token_id,
                logprob=r.logprob,
                top_tokens=[shard_pb2.TopToken(token_id=t, logprob=lp) for t, lp in r.top_tokens],
            )
            for r in results
        ],
        forward_us=(time.perf_counter_ns() - started_ns) // 1000,
        steps=steps,
    )


def _step_from_proto(msg: shard_pb2.SequenceStep) -> SequenceStep:
    return SequenceStep(
        seq_id=msg.seq_id,
        token_ids=list(msg.token_ids),
        start_position=msg.start_position,
        slot_mapping=list(msg.slot_mapping),
        block_table=list(msg.block_table),
        sample=msg.sample,
        sampling=SamplingParams.from_proto(msg.sampling) if msg.HasField("sampling") else None,
        prefix_token_ids=list(msg.prefix_token_ids),
    )


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


def kv_budget_bytes(runner: ModelRunner) -> int:
    """Memory this shard may give its KV cache (on CUDA, Warmup further caps it by free memory)."""
    if runner.device.type == "cuda":
        return 1 << 62
    available = _mem_available_bytes()
    return min(int(available * CPU_KV_MEMORY_FRACTION), CPU_KV_MEMORY_CAP) // runner.parallel.world_size


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 4 << 30


def pick_device(name: str, rank: int) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK as torchrun sets it) when CUDA is there, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        return torch.device("cuda", local)
    return torch.device("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    parser.add_argument("--rank", type=int, default=int(env.get("RANK", 0)), help="default: $RANK or 0")
    parser.add_argument(
        "--world-size", type=int, default=int(env.get("WORLD_SIZE", 1)), help="default: $WORLD_SIZE or 1"
    )
    add_listen_arguments(parser)
    parser.add_argument(
        "--dtype", choices=[*DTYPES, "auto"], default="auto", help="auto: float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="hold attention and experts with bitsandbytes: LLM.int8 (bitsandbytes) or 4-bit (default: not quantized)",
    )
    parser.add_argument(
        "--moe-parallel",
        choices=MOE_PARALLEL_MODES,
        default="tp",
        help="tp: every rank holds a slice of every expert; ep: each rank holds num_experts / world_size whole experts",
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
        choices=native_kernels.MODES,
        default="auto",
        help="decode attention and decode-sized MoE: auto (C kernels for fp32 on CPU where a C compiler builds "
        "them, else torch), native (the C kernels or fail), torch",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (one per shard is fastest)")
    parser.add_argument("--master-addr", help="rendezvous address (default: $MASTER_ADDR or 127.0.0.1)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: $MASTER_PORT or 29500)")


def run(args: argparse.Namespace) -> int:
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
    device = pick_device(args.device, args.rank)
    dtype = DTYPES["bfloat16" if device.type == "cuda" else "float32"] if args.dtype == "auto" else DTYPES[args.dtype]
    quantization = QuantizationConfig(args.quantize) if args.quantize else None
    model_dir = args.model
    if model_dir is None:
        from shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    try:
        parallel.check(ModelConfig.from_pretrained(model_dir))
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
        # Built here (cached after the first time), not on the first request.
        native = native_kernels.select(args.kernels, native_kernels.LIBRARIES)
    except KernelUnavailable as e:
        log.error("event=kernel_unavailable error=%r", str(e))
        return 2
    log.info("event=kernels mode=%s native=%s", args.kernels, native)
    init_process_group(parallel, device)
    group = tensor_parallel_group(parallel, device, args.collectives)
    model = load_model(model_dir, parallel, group, dtype, device, quantization)
    grammars = grammar_matchers(model_dir, model, device)
    runner = ModelRunner(model, parallel, group, device, dtype, args.block_size, grammars)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=listen.interceptors(),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    shard_pb2_grpc.add_ShardServiceServicer_to_server(
        ShardServicer(runner, model_dir, args.max_kv_blocks, args.quantize or ""), server
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
