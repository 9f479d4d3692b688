"""`mixserve bench gpu`: Mixtral-8x7B's GPU path measured in one prepared command.

(a) One decoder layer of one rank of four at Mixtral-8x7B's shapes (bf16): decode at batch
{1, 8, 32, 64, 128, 256} x context {256, 1k, 4k}, prefill of 8 x 512 and of a 4096-token chunk at
position 16k; today's torch path vs the Triton kernels vs the kernels replayed from a CUDA graph;
time, peak memory, error against the torch path and % of the copy bandwidth measured in the same
run (gpu_kernels.py). From those, the whole model on one rank (layers x layer + LM head) against
the issue's targets. (b) The whole server at TP 1 under `bench serve` (gpu_server.py). (c), run first:
the tokens a small Mixtral with a rank's attention shape generates through the server on the device, in
bf16 and fp32, against transformers' fp32 forward on the same device (gpu_agree.py).

`--dry-run` runs the same code at tiny shapes in fp32 on the CPU, the Triton kernels in Triton's
interpreter and the graph variant eager, the server part on the demo checkpoint on the CPU (two levels
of a few 8-token requests) and the agreement in fp32 on a tiny model. CI runs it. Results go to
`--out` (default benchmarks/results/gpu-<UTC time>/): gpu.json, gpu.md, gpu.png, server.log.
Runnable as `python -m benchmarks.gpu` too, which imports no other harness module.
"""

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from mixserve.benchmarks import report

log = logging.getLogger("mixserve.bench")

RESULTS = Path(__file__).resolve().parent / "results"
# Part (a) stops starting cases once this much of --time-budget is left for the server.
SERVER_RESERVE_S = 180.0
# Part (c)'s share of --time-budget (both dtypes' servers and the reference).
AGREE_BUDGET_S = 110.0


def suites():
    """The full and the dry-run suites (imported late: torch and triton load only when the command runs)."""
    import torch

    from mixserve.benchmarks.gpu_kernels import Suite
    from mixserve.benchmarks.gpu_layer import MIXTRAL_8X7B_RANK, TINY_RANK

    full = Suite(
        shapes=MIXTRAL_8X7B_RANK,
        dtype=torch.bfloat16,
        batches=(1, 8, 32, 64, 128, 256),
        contexts=(256, 1024, 4096),
        prefills=(("prefill 8 x 512", ((0, 512),) * 8), ("chunk 4096 at 16k", ((16384, 4096),))),
        copy_bytes=2 * 2**30,
        matmul_size=8192,
        iteration_budget_s=0.25,
        warmup=2,
        whole_model_context=1024,
        whole_model_batches=(1, 64),
    )
    tiny = Suite(
        shapes=TINY_RANK,
        dtype=torch.float32,
        batches=(1, 3),
        contexts=(5, 17),
        prefills=(("prefill 2 x 8", ((0, 8), (0, 8))), ("chunk 8 at 24", ((24, 8),))),
        copy_bytes=16 * 2**20,
        matmul_size=256,
        iteration_budget_s=0.0,
        warmup=0,
        whole_model_context=17,
        whole_model_batches=(1, 3),
    )
    return full, tiny


def ordered_cases(suite) -> list[tuple]:
    """Decode cases the whole-model figures need first, then the prefills, then the rest of the grid:
    what a time budget cuts is the least needed."""
    first = [("decode", b, suite.whole_model_context) for b in suite.whole_model_batches]
    rest = [("decode", b, c) for c in suite.contexts for b in suite.batches if ("decode", b, c) not in first]
    return first + [("prefill", name, chunks) for name, chunks in suite.prefills] + rest


def _gpu_info(device) -> dict:
    import torch
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    return {"name": name, "torch": torch.__version__, "triton": triton.__version__}


def run_kernels(suite, device, dry_run: bool, budget_s: float) -> dict:
    """Part (a): ceilings, every case within budget_s (the rest recorded as skipped), whole model, targets."""
    import torch

    from mixserve.benchmarks import gpu_kernels as gk
    from mixserve.benchmarks import gpu_model
    from mixserve.benchmarks.gpu_layer import LayerWeights

    started = time.monotonic()
    ceilings = {
        "bandwidth": gk.measure_bandwidth(device, suite.copy_bytes),
        "matmul": gk.measure_matmul(device, suite.matmul_size, suite.dtype),
    }
    bandwidth = ceilings["bandwidth"]["gb_s"]
    log.info("event=ceilings bandwidth_gb_s=%.0f matmul_tflop_s=%.1f", bandwidth, ceilings["matmul"]["tflop_s"])
    longest = max([*suite.contexts, *(s + n for _, chunks in suite.prefills for s, n in chunks)])
    weights = LayerWeights.random(suite.shapes, longest, suite.dtype, device)
    cases = []
    for kind, first, second in ordered_cases(suite):
        name = f"decode b{first} c{second}" if kind == "decode" else first
        if time.monotonic() - started > budget_s:
            cases.append({"kind": kind, "name": name, "skipped": "time budget spent"})
            continue
        try:
            if kind == "decode":
                case = gk.decode_case(suite, weights, first, second, device, bandwidth)
            else:
                case = gk.prefill_case(suite, weights, first, second, device, bandwidth)
        except Exception as error:  # noqa: BLE001
            # Setting a case up failed (its variants record their own failures): the other cases still run.
            case = {"kind": kind, "name": name, "skipped": f"failed: {type(error).__name__}: {error}"[:300]}
            log.warning("event=case_failed name=%s error=%s", name, case["skipped"].splitlines()[0])
            cases.append(case)
            continue
        log.info("event=case name=%s %s", name, _case_log(case))
        cases.append(case)
    lm_heads = [gpu_model.lm_head_case(suite, batch, device) for batch in suite.whole_model_batches]
    whole = gpu_model.whole_model(suite, cases, lm_heads, bandwidth)
    graphs = device.type == "cuda"
    del weights
    if graphs:
        torch.cuda.empty_cache()
    return {
        "ceilings": ceilings,
        "graphs": graphs,
        "cases": cases,
        "lm_head": lm_heads,
        "whole_model": whole,
        "targets": gpu_model.targets(whole, suite.whole_model_batches[1], dry_run),
        "kernels_s": round(time.monotonic() - started, 1),
    }


def _case_log(case: dict) -> str:
    return " ".join(f"{n}_ms={r['ms'] if r['ms'] is None else round(r['ms'], 3)}" for n, r in case["variants"].items())


def run_server_part(args: argparse.Namespace, device, out: Path, remaining_s: float) -> dict:
    """Part (b): Mixtral-8x7B at TP 1 on the GPU; in a dry run the demo on the CPU, two levels of a few
    short requests, so the same path runs in CI. A skip carries its reason."""
    from mixserve.benchmarks import gpu_server

    if args.skip_server:
        return {"status": "skipped", "reason": "--skip-server"}
    if not args.dry_run:
        reason = gpu_server.skip_reason(device.type)
        if reason is None and remaining_s < 60:
            reason = f"{remaining_s:.0f} s of --time-budget left"
        if reason:
            return {"status": "skipped", "reason": reason}
    with tempfile.TemporaryDirectory(prefix="mixserve-bench-gpu-") as scratch:
        if args.dry_run:
            model_args = gpu_server.demo_launch_args(Path(scratch))
            return gpu_server.run_server(out, model_args, max(remaining_s, 60.0), [1, 2], 8, 8)
        model_args = gpu_server.mixtral_launch_args(Path(scratch))
        return gpu_server.run_server(out, model_args, remaining_s, args.concurrency, args.input_len, args.output_len)


def run_agreement_part(args: argparse.Namespace, device, out: Path) -> dict:
    """Part (c): served tokens against transformers on this device (bf16 and fp32 on a GPU, fp32 in a
    dry run), or why it did not run."""
    from mixserve.benchmarks import gpu_agree, gpu_server

    if args.skip_agreement:
        return {"status": "skipped", "reason": "--skip-agreement"}
    missing = gpu_server.missing_modules()
    if missing:
        return {"status": "skipped", "reason": f"the server's imports are not installed: {', '.join(missing)}"}
    dtypes = ["float32"] if args.dry_run else ["bfloat16", "float32"]
    with tempfile.TemporaryDirectory(prefix="mixserve-bench-agree-") as scratch:
        try:
            return {"status": "ran", **gpu_agree.run_agreement(out, device, dtypes, AGREE_BUDGET_S, Path(scratch))}
        except Exception as error:  # noqa: BLE001 - the kernel and server parts still run
            log.warning("event=agreement_failed error=%s", error)
            return {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:300]}


def _default_out() -> Path:
    return RESULTS / f"gpu-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/gpu-<UTC time>)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton interpreted (CI)")
    parser.add_argument("--skip-server", action="store_true", help="only the kernels, not the whole server")
    parser.add_argument(
        "--skip-agreement", action="store_true", help="not the served tokens against transformers (part (c))"
    )
    parser.add_argument(
        "--time-budget", type=float, default=420.0, help="seconds for everything; cases past it are recorded as skipped"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="server load levels")
    parser.add_argument("--input-len", type=int, default=128, help="server prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="server output tokens")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    if args.time_budget <= 0:
        raise SystemExit("--time-budget must be positive")
    if args.dry_run:
        # The interpreter is chosen when triton is first imported: before anything below imports it.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from mixserve.shards.triton import attention

    full, tiny = suites()
    suite = tiny if args.dry_run else full
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run and not attention.interpreted():
        raise SystemExit("--dry-run needs Triton's interpreter, but triton was imported before TRITON_INTERPRET=1")
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: run `mixserve bench gpu --dry-run` for the CPU check")
    torch.manual_seed(0)
    out = args.out or _default_out()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    server_reserve = 0.0 if args.skip_server else SERVER_RESERVE_S
    agreement = run_agreement_part(args, device, out)
    kernel_budget = args.time_budget - server_reserve - (time.monotonic() - started)
    result = {
        "meta": report.run_meta(),
        "dry_run": args.dry_run,
        "gpu": _gpu_info(device),
        "dtype": str(suite.dtype).removeprefix("torch."),
        "shapes": {k: getattr(suite.shapes, k) for k in suite.shapes.__dataclass_fields__},
        "agreement": agreement,
        **run_kernels(suite, device, args.dry_run, max(0.0, kernel_budget)),
    }
    # Written now and again at the end: a server part cut short by an outer timeout keeps the kernel figures.
    result["server"] = {"status": "skipped", "reason": "not reached: the run stopped before the server part"}
    write_results(result, out)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the server's shard shares this GPU
    result["server"] = run_server_part(args, device, out, args.time_budget - (time.monotonic() - started))
    if result["server"]["status"] == "skipped":
        log.info("event=server_skipped reason=%s", result["server"]["reason"])
    sys.stdout.write(write_results(result, out) + "\n")
    return 0


def write_results(result: dict, out: Path) -> str:
    """gpu.json, gpu.md and gpu.png (without matplotlib: none) in out; returns the Markdown."""
    from mixserve.benchmarks import gpu_report

    result["plot"] = "gpu.png" if gpu_report.plot_roofline(result, out / "gpu.png") else None
    report.write_json(result, out / "gpu.json")
    table = gpu_report.gpu_markdown(result)
    (out / "gpu.md").write_text(table + "\n")
    return table


def main() -> int:
    """`python -m benchmarks.gpu`: the command without the rest of the harness's imports."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
