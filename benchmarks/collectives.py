"""`mixserve bench collectives`: the per-call cost of the shards' all-reduce on this host.

Starts a real group of processes for each rank count and path, as the shards would be: `shm-c`
(shared memory through the C exchange, the default on CPU), `shm-torch` (shared memory through
torch ops, `--kernels torch`) and `gloo` (torch.distributed, `--collectives torch`). Every rank
times each all-reduce of a float32 tensor of each size; rank 0's times are reported (the wait for
the slowest rank included, as in a decode step).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mixserve.benchmarks.metrics import distribution_ms
from mixserve.benchmarks.processes import child_env, free_port
from mixserve.benchmarks.report import meta_lines, run_meta

PATHS = {"shm-c": ("shm", "auto"), "shm-torch": ("shm", "torch"), "gloo": ("torch", "torch")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="group sizes (default: 2 4)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS), help="default: all")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 2048, 8192], help="float32 elements per call (default: 1 2048 8192)"
    )
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per size (gloo: a tenth)")
    parser.add_argument("--out", type=Path, help="write collectives.json and collectives.md here")


def run_group(ranks: int, path: str, sizes: list[int], calls: int) -> dict[str, dict]:
    """{size: distribution of rank 0's per-call ms} for one group."""
    collectives, kernels = PATHS[path]
    port = str(free_port())
    cmd = [sys.executable, "-m", "mixserve.benchmarks.collectives", "--worker", collectives, kernels, str(calls)]
    cmd += [str(s) for s in sizes]
    procs = [
        subprocess.Popen(
            cmd,
            env=child_env(RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(ranks)
    ]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for rank, (p, output) in enumerate(zip(procs, outputs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"{path} at {ranks} ranks: rank {rank} failed:\n{output[-2000:]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def worker(collectives: str, kernels: str, calls: int, sizes: list[int]) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): print rank 0's timings as JSON."""
    import torch

    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import close_process_group, init_process_group, tensor_parallel_group
    from mixserve.shards.kernels import native

    torch.set_num_threads(1)
    parallel = ParallelConfig(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    device = torch.device("cpu")
    init_process_group(parallel, device)
    native.select(kernels, ("shm_exchange",))
    group = tensor_parallel_group(parallel, device, collectives)
    result = {}
    for size in sizes:
        tensor = torch.randn(size)
        for _ in range(max(calls // 10, 5)):
            group.all_reduce(tensor)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            group.all_reduce(tensor)
            times.append(time.perf_counter() - started)
        result[str(size)] = distribution_ms(times)
    close_process_group()
    if parallel.rank == 0:
        print(json.dumps(result))


def markdown(result: dict) -> str:
    lines = [
        "### All-reduce per call between the CPU shards of one host",
        "",
        *meta_lines(result["meta"]),
        "- rank 0's time per call, the wait for the other ranks included; one torch thread per rank",
        "",
        "| ranks | path | float32 elements | calls | ms p50 | ms p90 | ms p99 | ms mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        d = row["ms"]
        lines.append(
            f"| {row['ranks']} | {row['path']} | {row['size']} | {row['calls']} | {d['p50']:.3f} | {d['p90']:.3f}"
            f" | {d['p99']:.3f} | {d['mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    result = {"meta": run_meta(), "rows": []}
    for ranks in args.ranks:
        for path in args.paths:
            calls = args.calls if path != "gloo" else max(args.calls // 10, 10)
            for size, dist in run_group(ranks, path, args.sizes, calls).items():
                result["rows"].append({"ranks": ranks, "path": path, "size": int(size), "calls": calls, "ms": dist})
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "collectives.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "collectives.md").write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), [int(s) for s in sys.argv[5:]])
