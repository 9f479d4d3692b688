"""`mixserve bench decode-step`: a shard's batch-1 decode step in-process, per weight format.

Loads the model once per variant (fp32, bf16, int8-wo in fp32, int8-wo in bf16: `--variants`) on one
rank, on one thread (a shard's core), with the ops `auto` picks (the C kernels where they build), and
times the model's forward for one token at a context of `--context` tokens: the step a single stream
decodes with, which reads every weight it touches once. With `--num-shard N` it runs on N
tensor-parallel ranks, a process and a thread each, joined as the shards join (torch.distributed
for the rendezvous, the shared-memory collectives for the all-reduces), and reports rank 0's times:
the all-reduces bind the ranks' steps together. The variants' steps alternate round by round, so a
shared machine's noise falls on all of them alike; each reports the median over rounds. Weights come
from the checkpoint, or (`--config` a config.json of any shape, e.g. the 0.8B of issue 20) are drawn
at random (`--load-format dummy`), optionally with fewer layers (`--num-layers`) to fit a minute.

Each round also times a read of as many bytes as a variant's step reads (`step_read_bytes`: its
weights but the embedding table, top-k of E of its experts, the KV of its context), on every rank at
once (one thread a rank, the ranks started together), by each of read_bandwidth.py's methods in turn
(torch's sum over an fp32 buffer, benchmarks/read_streams.c's reads of 4 and 8 streams at once), one
read a round so that each meets the caches as the step does: the bandwidth roofline for those bytes is
the fastest method's median, measured beside the steps, since this machine's bandwidth moves between
minutes. `% roofline` is that median over the step's. With THP_MEM_ALLOC_ENABLE=1 in the environment the
weights and that read's buffer both sit on huge pages, as a shard's would (shards/huge_pages.py).
"""

import argparse
import contextlib
import json
import logging
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("mixserve.bench")

# name -> (dtype, --quantize mode); int8-bf16 is int8-wo with bf16 embeddings, norms, gates and KV cache.
VARIANTS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", "int8-wo"),
    "int8-bf16": ("bfloat16", "int8-wo"),
}
DEFAULT_VARIANTS = "fp32,bf16,int8"
BLOCK_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint dir (default: the demo checkpoint)")
    parser.add_argument("--config", type=Path, help="a config.json: random weights of its shape instead")
    parser.add_argument("--num-layers", type=int, help="with --config: this many layers instead of its own")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--context", type=int, default=128, help="tokens of context the decoded token attends to")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant (alternating)")
    parser.add_argument("--num-shard", type=int, default=1, help="tensor-parallel ranks, a process each")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")


def _model_dir(args: argparse.Namespace, scratch: Path) -> tuple[str, str]:
    """The directory to load from and the load format."""
    if args.config is None:
        if args.model is not None:
            return args.model, "auto"
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        return str(ensure_demo_checkpoint()), "auto"
    config = json.loads(args.config.read_text())
    if args.num_layers is not None:
        config["num_hidden_layers"] = args.num_layers
    (scratch / "config.json").write_text(json.dumps(config))
    return str(scratch), "dummy"


def _load(model_dir: str, load_format: str, variant: str, parallel, group):
    import torch

    from mixserve.shards.loader import load_model, weight_bytes
    from mixserve.shards.quant.config import QuantizationConfig

    dtype_name, quantize = VARIANTS[variant]
    model = load_model(
        model_dir,
        parallel,
        group,
        dtype=getattr(torch, dtype_name),
        quantization=QuantizationConfig(quantize) if quantize else None,
        load_format=load_format,
    )
    return model, weight_bytes(model)


def step_read_bytes(model, kv_cache, context: int) -> int:
    """Bytes one batch-1 decode step reads on this rank: every weight it holds (as `weight_bytes` counts
    them) but the embedding table, of which it reads one row, and but the experts one token does not
    route to (it reads top-k of E of each layer's expert bytes: under expert parallelism that many in
    expectation); plus K and V of `context` positions in every layer."""
    from mixserve.shards.loader import weight_bytes

    cfg = model.config
    embedding = model.embed_tokens.weight
    total = weight_bytes(model) - embedding.numel() * embedding.element_size()
    total += embedding.shape[1] * embedding.element_size()
    unread = 1 - cfg.num_experts_per_tok / cfg.num_local_experts
    for layer in model.layers:
        moe = layer.block_sparse_moe
        experts = sum(p.numel() * p.element_size() for n, p in moe.named_parameters() if n != "gate")
        total -= unread * (experts + (moe.quantized.nbytes if moe.quantized is not None else 0))
    layers, _, _, kv_heads, head_dim = kv_cache.keys.shape
    total += 2 * layers * kv_heads * head_dim * context * kv_cache.keys.element_size()
    return int(total)


def _decode_step(model, kv_cache, context: int):
    """A closure running one batch-1 decode step at position context - 1."""
    import torch

    from mixserve.shards.attention_metadata import AttentionMetadata

    blocks = -(-context // BLOCK_SIZE)
    table = torch.arange(blocks).unsqueeze(0)  # [1, M]
    position = context - 1
    meta = AttentionMetadata(
        slot_mapping=table[:, position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE,
        num_decode_tokens=1,
        decode_block_tables=table,
        decode_context_lens=torch.tensor([context]),
    )
    token, positions, rows = torch.tensor([1]), torch.tensor([position]), torch.tensor([0])

    def step() -> None:
        model(token, positions, kv_cache, meta, rows)

    return step


def _measure(args: argparse.Namespace, variants: list[str], parallel=None, group=None) -> dict[str, dict]:
    """Each variant's step times, this rank's weight bytes and decoder-layer backend, the rounds
    alternating (one rank unless `parallel` and `group` say otherwise)."""
    import torch

    from mixserve.benchmarks.read_bandwidth import read_methods, read_once
    from mixserve.shards import ops
    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.kv_cache import KVCache

    if parallel is None:
        parallel = ParallelConfig()
        group = TensorParallelGroup(parallel)

    steps, sizes, backends, reads = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch, torch.inference_mode():
        model_dir, load_format = _model_dir(args, Path(scratch))
        for name in variants:
            model, sizes[name] = _load(model_dir, load_format, name, parallel, group)
            cfg, dtype = model.config, getattr(torch, VARIANTS[name][0])
            chosen = ops.select("auto", torch.device("cpu"), dtype)
            backends[name] = chosen.backends["decoder_layers"]
            blocks = -(-args.context // BLOCK_SIZE)
            kv_heads = cfg.num_key_value_heads // parallel.world_size
            shape = (cfg.num_hidden_layers, blocks, BLOCK_SIZE, kv_heads, cfg.head_dim)
            cache = KVCache(*shape, dtype, torch.device("cpu"))
            steps[name] = (_decode_step(model, cache, args.context), dtype)
            steps[name][0]()  # warm-up: first-use gathering of the kernels' weights
            read = step_read_bytes(model, cache, args.context)
            reads[name] = (read, torch.ones(read // 4, dtype=torch.float32))
        times: dict[str, list[float]] = {name: [] for name in variants}
        methods = list(read_methods())
        read_times: dict[str, dict[str, list[float]]] = {name: {m: [] for m in methods} for name in variants}
        together = torch.distributed.barrier if parallel.world_size > 1 else lambda: None
        for round_ in range(args.rounds):
            method = methods[round_ % len(methods)]
            for name in variants:
                step, dtype = steps[name]
                ops.select("auto", torch.device("cpu"), dtype)
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
                together()
                read_times[name][method].append(read_once(reads[name][1], method))
    return {
        name: _summary(times[name], read_times[name], reads[name][0], sizes[name], backends[name]) for name in variants
    }


def _summary(times: list[float], read_times: dict[str, list[float]], read_bytes: int, size: int, backend: str) -> dict:
    step = statistics.median(times)
    read, method = min((statistics.median(t), method) for method, t in read_times.items() if t)
    return {
        "median_ms": step * 1e3,
        "min_ms": min(times) * 1e3,
        "p90_ms": statistics.quantiles(times, n=10)[-1] * 1e3 if len(times) > 1 else step * 1e3,
        "weight_bytes": size,
        "step_read_bytes": read_bytes,
        "read_median_ms": read * 1e3,
        "read_method": method,
        "roofline_fraction": read / step,
        "decoder_layers": backend,
    }


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, variants: list[str], answers) -> None:
    """One rank of a `--num-shard N` measurement, in its own process: rank 0 puts its results on `answers`."""
    import os

    import torch

    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import close_process_group, init_process_group, tensor_parallel_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    parallel = ParallelConfig(rank, world_size)
    init_process_group(parallel, torch.device("cpu"))
    try:
        group = tensor_parallel_group(parallel, torch.device("cpu"), "shm")
        results = _measure(args, variants, parallel, group)
        if rank == 0:
            answers.put(results)
    finally:
        close_process_group()


def _measure_ranks(args: argparse.Namespace, variants: list[str]) -> dict[str, dict]:
    """_measure on `args.num_shard` ranks, each a process; rank 0's results."""
    import multiprocessing

    from mixserve.benchmarks.processes import free_port

    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    port = free_port()
    ranks = [
        context.Process(target=_rank_main, args=(rank, args.num_shard, port, args, variants, answers))
        for rank in range(args.num_shard)
    ]
    for process in ranks:
        process.start()
    # Read before joining: a process that has put on a queue exits only once its data is read.
    results = None
    while results is None and all(process.exitcode in (None, 0) for process in ranks):
        with contextlib.suppress(queue.Empty):
            results = answers.get(timeout=1)
    for process in ranks:
        process.join()
    failed = [rank for rank, process in enumerate(ranks) if process.exitcode != 0]
    if failed or results is None:
        raise SystemExit(f"decode-step ranks {failed} failed (exit codes {[ranks[r].exitcode for r in failed]})")
    return results


def markdown(results: dict[str, dict], context: int, rounds: int, num_shard: int = 1) -> str:
    """The results as a table, speed-ups taken to the first variant."""
    first = next(iter(results))
    where = "one thread" if num_shard == 1 else f"{num_shard} tensor-parallel ranks of one thread, rank 0's times"
    lines = [
        f"batch-1 decode step, context {context}, {rounds} alternating rounds, {where}",
        f"| variant | weight MiB (a rank's) | step reads MB (a rank's) | median ms | p90 ms | min ms |"
        f" speed-up vs {first} | GB/s (all ranks) | read of those bytes, median ms | % roofline | decoder_layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rate = num_shard * r["step_read_bytes"] / (r["median_ms"] / 1e3) / 1e9
        lines.append(
            f"| {name} | {r['weight_bytes'] / 2**20:.1f} | {r['step_read_bytes'] / 1e6:.1f} | {r['median_ms']:.2f} |"
            f" {r['p90_ms']:.2f} | {r['min_ms']:.2f} | {results[first]['median_ms'] / r['median_ms']:.2f}x |"
            f" {rate:.1f} | {r['read_median_ms']:.2f} | {100 * r['roofline_fraction']:.0f} % | {r['decoder_layers']} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s bench %(levelname)s %(message)s")
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    num_shard = args.num_shard
    if num_shard < 1:
        raise SystemExit(f"--num-shard must be >= 1, got {num_shard}")
    if num_shard > 1:
        results = _measure_ranks(args, variants)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = _measure(args, variants)
        finally:
            torch.set_num_threads(threads)
    sys.stdout.write(markdown(results, args.context, args.rounds, num_shard) + "\n")
    if args.out is not None:
        summary = {"context": args.context, "rounds": args.rounds, "num_shard": num_shard, "results": results}
        args.out.write_text(json.dumps(summary, indent=2))
    return 0
