"""Quantized shards next to fp32: weight bytes and peak memory per shard, decode tokens/s, closeness.

Each mode runs as a real tensor-parallel group of this module's processes (torchrun's variables,
the collectives `mixserve shard` picks), on the demo checkpoint unless --model is given. Per mode:
weight bytes per shard (as Info reports them) and their share of fp32's; the shard's peak memory
(resident set on CPU, allocated on CUDA); load time (with the bitsandbytes import and start-up
probe); greedy decode tokens/s at each batch size, from the median step after one prefill of
`--prompt-tokens` per sequence; and the last-token logits of a fixed prompt set against fp32's
(mean relative error, top-1 agreement). Rows go to benchmarks/results/quantization.json and .md
with the command and the machine.

    python -m benchmarks.quantization --num-shard 2 --batch-sizes 1,8 --decode-steps 32
"""

import argparse
import json
import logging
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger("mixserve.bench.quantization")
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ["fp32", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"]
CLOSENESS_PROMPTS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the demo model)")
    parser.add_argument("--num-shard", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help="fp32 (not quantized) and --quantize modes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per shard)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16; auto: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch-sizes", default="1,8", help="decoding sequences per step")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=32, help="timed greedy decode steps per batch size")
    parser.add_argument("--rounds", type=int, default=3, help="sweeps over the modes; each keeps its best")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md (default: results/quantization-Nshard)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def worker(args: argparse.Namespace) -> None:
    """One rank: load the model in one mode, measure, and write this rank's JSON to args.worker."""
    import torch

    from mixserve.shards.config import DTYPES, ParallelConfig
    from mixserve.shards.distributed import close_process_group, init_process_group, tensor_parallel_group
    from mixserve.shards.loader import load_model, weight_bytes
    from mixserve.shards.quant.config import QuantizationConfig
    from mixserve.shards.runner import ModelRunner
    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.sequence_step import SequenceStep

    torch.set_num_threads(1)
    parallel = ParallelConfig(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{parallel.rank}")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = None if args.modes == "fp32" else QuantizationConfig(args.modes)
    init_process_group(parallel, device)
    group = tensor_parallel_group(parallel, device)
    started = time.perf_counter()
    model = load_model(args.model, parallel, group, dtype, device, quantization)
    load_s = time.perf_counter() - started
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    block_size = 16
    blocks_per_seq = -(-(max(args.prompt_tokens, 64) + args.decode_steps + 2) // block_size)
    runner = ModelRunner(model, parallel, group, device, dtype, block_size)
    runner.allocate_cache(max(*batch_sizes, CLOSENESS_PROMPTS) * blocks_per_seq)
    greedy = SamplingParams(temperature=0.0)
    vocab = model.config.vocab_size

    def step(seq: int, tokens: list[int], start: int, sampling=None) -> SequenceStep:
        table = list(range(seq * blocks_per_seq, (seq + 1) * blocks_per_seq))
        slots = [table[p // block_size] * block_size + p % block_size for p in range(start, start + len(tokens))]
        return SequenceStep(seq, tokens, start, slots, table, True, sampling)

    decode = {}
    for batch in batch_sizes:
        runner.clear()
        prompts = [[(s * 977 + p * 31) % (vocab - 3) + 3 for p in range(args.prompt_tokens)] for s in range(batch)]
        last = [r.token_id for r in runner.step([step(s, p, 0, greedy) for s, p in enumerate(prompts)])]
        wall, cpu = [], []
        for n in range(args.decode_steps + 1):
            started, started_cpu = time.perf_counter(), time.process_time()
            last = [r.token_id for r in runner.step([step(s, [t], args.prompt_tokens + n) for s, t in enumerate(last)])]
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        # Medians, the first (warm-up) step left out, so that a busy machine's stalls move them less;
        # the CPU time of a step is what this rank computed, whatever else the machine ran.
        median = statistics.median(wall[1:])
        decode[batch] = {
            "tokens_per_s": batch / median,
            "ms_per_step": 1e3 * median,
            "cpu_ms_per_step": 1e3 * statistics.median(cpu[1:]),
        }
    runner.clear()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 64, (CLOSENESS_PROMPTS,), generator=generator).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    logits = runner.forward([step(s, p, 0) for s, p in enumerate(prompts)]).float().cpu()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"weight_bytes": weight_bytes(model), "peak_bytes": peak, "load_s": load_s, "decode": decode}
    Path(args.worker).write_text(json.dumps(record))
    if parallel.rank == 0:
        torch.save(logits, f"{args.worker}.logits")
    close_process_group()


def run_mode(args: argparse.Namespace, mode: str, model_dir: str, tmp: Path) -> list[dict]:
    """Start the group for `mode`; every rank's record, rank 0's with its logits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mixserve.benchmarks.quantization", "--model", model_dir, "--modes", mode]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--batch-sizes", args.batch_sizes]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--decode-steps", str(args.decode_steps)]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.num_shard))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [*cmd, "--worker", str(tmp / f"{mode}.rank{r}")],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(args.num_shard)
    ]
    for r, p in enumerate(procs):
        output, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{mode}: rank {r} failed:\n{output[-3000:]}")
    return [json.loads((tmp / f"{mode}.rank{r}").read_text()) for r in range(args.num_shard)]


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {
        "host": platform.node(),
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "bitsandbytes": version("bitsandbytes"),
    }


def markdown(report: dict) -> str:
    """The report as a page: command, machine, one table row per mode."""
    batches = report["batch_sizes"]
    head = ["mode", "weight MB/shard", "of fp32", "peak MB/shard", "load s"]
    head += [f"decode tok/s (batch {b})" for b in batches] + [f"CPU ms/step (batch {b})" for b in batches]
    head += ["logit rel. error", "top-1 agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [row["mode"], f"{row['weight_bytes'] / 1e6:.2f}", f"{row['weight_share']:.1%}"]
        cells += [f"{row['peak_bytes'] / 1e6:.0f}", f"{row['load_s']:.2f}"]
        cells += [f"{row['decode'][str(b)]['tokens_per_s']:.1f}" for b in batches]
        cells += [f"{row['decode'][str(b)]['cpu_ms_per_step']:.1f}" for b in batches]
        cells += [f"{row['relative_error']:.3f}", f"{row['top1_agreement']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    return "\n".join(
        [
            "# bitsandbytes shards next to fp32",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores ({m['host']}); Python {m['python']}, torch {m['torch']}, "
            f"bitsandbytes {m['bitsandbytes']}. Shards: {report['num_shard']} on {report['device']}, "
            f"load average {report['load_average'][0]:.1f} before and {report['load_average'][1]:.1f} after.",
            "",
            *lines,
            "",
            "Weight bytes are what Info reports per shard (largest rank): quantized tensors plus their",
            "quantization state; embeddings, norms, router gates and lm_head stay in the compute dtype.",
            "Peak memory is the whole process (torch, and for quantized modes bitsandbytes with the",
            "torch.compile machinery it imports), so on a model this small it says little about weights.",
            f"Closeness: last-token logits of {CLOSENESS_PROMPTS} fixed random prompts against fp32's.",
            f"Decode: median step time of {report['decode_steps']} greedy steps after a prefill of "
            f"{report['prompt_tokens']} tokens per sequence; best of {report['rounds']} interleaved rounds. CPU",
            "ms/step is rank 0's own CPU time per step (its share of the compute, not disturbed by other",
            "processes; with shared-memory collectives it includes the waits for the other ranks).",
            "",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """Run every mode's group (or, with --worker, be one rank of one) and write the results."""
    if args.worker:
        worker(args)
        return 0
    if min(args.decode_steps, args.num_shard, args.rounds) < 1:
        raise SystemExit("--decode-steps, --num-shard and --rounds must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    modes = args.modes.split(",")
    model_dir = args.model
    if model_dir is None:
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    import torch

    load_before = os.getloadavg()[0]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mixserve-quant-bench-") as tmp:
        # Rounds interleave the modes, and each keeps its best round: a busy machine's slow spells
        # then fall on every mode alike instead of on whichever ran during them.
        for _ in range(args.rounds):
            for mode in ["fp32", *[m for m in modes if m != "fp32"]]:
                ranks = run_mode(args, mode, model_dir, Path(tmp))
                logits = torch.load(Path(tmp) / f"{mode}.rank0.logits")
                if mode == "fp32":
                    fp32_bytes, reference = max(r["weight_bytes"] for r in ranks), logits
                row = {
                    "mode": mode,
                    "weight_bytes": max(r["weight_bytes"] for r in ranks),
                    "weight_bytes_per_rank": [r["weight_bytes"] for r in ranks],
                    "weight_share": max(r["weight_bytes"] for r in ranks) / fp32_bytes,
                    "peak_bytes": max(r["peak_bytes"] for r in ranks),
                    "load_s": max(r["load_s"] for r in ranks),
                    "decode": ranks[0]["decode"],
                    "relative_error": float(((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).mean()),
                    "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                }
                log.info("event=mode_done %s", json.dumps(row))
                best = rows.setdefault(mode, row)
                best["load_s"] = min(best["load_s"], row["load_s"])
                for batch, timing in row["decode"].items():
                    if timing["tokens_per_s"] > best["decode"][batch]["tokens_per_s"]:
                        best["decode"][batch] = timing
    report = {
        "command": "python -m benchmarks.quantization " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "model": model_dir,
        "num_shard": args.num_shard,
        "device": args.device,
        "batch_sizes": args.batch_sizes.split(","),
        "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_steps,
        "rounds": args.rounds,
        "load_average": [load_before, os.getloadavg()[0]],
        "rows": [row for mode, row in rows.items() if mode in modes],
    }
    out = args.out or RESULTS / f"quantization-{args.num_shard}shard"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
