"""`mixserve bench`: the benchmark harness's commands.

- `serve`: load a running server (concurrency sweep or Poisson arrivals) and report throughput and latency.
- `latency`: shard prefill/decode step latency over direct gRPC, and the router's own overhead.
- `decode-step`: a batch-1 decode step in-process, fp32 vs bf16 vs weight-only int8, on one rank or N (`--num-shard`).
- `int8-prefill`: int8-wo against bf16 per op (linear, LM head, MoE) at prefill-sized row counts.
- `roofline`: this machine's memory bandwidth and matmul FLOP/s, and the model's ceilings on it.
- `compare`: mixserve (1 and 4 shards), the naive baseline and every installed peer, one after another.
- `collectives`: the shards' all-reduce per call on this host (shared memory through C or torch, gloo).
- `gpu`: one layer's kernels at Mixtral-8x7B's shapes (torch vs Triton vs CUDA graphs) and the server at TP 1.
- `gpu-spec`: speculative decoding with a draft model on one GPU, target and draft trained there first.
- `copy-demo`: fine-tune a trained demo to copy from its context (induction heads taught), for the copy workload.
- `copy-circuit`: write a demo-shaped checkpoint whose weights are an induction circuit (a near-exact copier).
- `structured`: half JSON-schema-constrained requests against all free ones, and a cached schema's TTFT.
- `priority`: urgent requests' latency under a full queue, `--scheduling-policy` fcfs against priority.
- `soak`: minutes of mixed load (every API, cancelled streams, bad bodies), then a request, KV and RSS leak check.
"""

import argparse
import importlib

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("mixserve.benchmarks.serve", "load a running server and report throughput and latency"),
    "latency": ("mixserve.benchmarks.latency", "shard step latency over gRPC and the router's overhead"),
    "decode-step": ("mixserve.benchmarks.decode_step", "a batch-1 decode step in-process, per weight format"),
    "int8-prefill": (
        "mixserve.benchmarks.int8_prefill",
        "int8-wo against bf16 per op at prefill-sized and large-batch row counts",
    ),
    "roofline": ("mixserve.benchmarks.roofline", "memory bandwidth, FLOP/s and the model's ceilings on this machine"),
    "compare": ("mixserve.benchmarks.compare", "mixserve, the naive baseline and the peers side by side"),
    "collectives": (
        "mixserve.benchmarks.collectives",
        "the shards' all-reduce per call on this host: shared memory or gloo",
    ),
    "gpu": ("mixserve.benchmarks.gpu", "Mixtral-8x7B's GPU path: layer kernels vs today's torch path, then the server"),
    "gpu-spec": ("mixserve.benchmarks.gpu_spec", "speculative decoding with a draft model on one GPU, trained weights"),
    "copy-demo": (
        "mixserve.benchmarks.copy_demo",
        "fine-tune a trained demo checkpoint to copy from its context (the copy workload's model)",
    ),
    "copy-circuit": (
        "mixserve.benchmarks.copy_circuit",
        "write a demo-shaped checkpoint whose weights copy from the context (an induction circuit, written)",
    ),
    "structured": (
        "mixserve.benchmarks.structured",
        "half JSON-schema-constrained vs all-free load, cached-schema TTFT",
    ),
    "priority": (
        "mixserve.benchmarks.priority",
        "urgent requests' latency under a full queue: fcfs against priority scheduling",
    ),
    "soak": ("mixserve.benchmarks.soak", "minutes of mixed load, then a request, KV block and RSS leak check"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per harness module; each module adds its own flags."""
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen sub-command."""
    return args.bench_run(args)
