"""`mixserve bench int8-prefill`: int8-wo against bf16 at prefill-sized and large-batch row counts, one op
at a time, in this process on one thread (a shard's core): a linear (the attention's fused q/k/v, and
the LM head) and the MoE's experts (top-2 of random routing) at a model's shape (by default issue 20's
0.8B: hidden 1024, 8 experts, intermediate 3584, vocab 32000), weights drawn at random.

Each row count times the ops `auto` picks (shards.ops.select) for bf16 weights in bf16, int8 weights in
bf16 and int8 weights in fp32, and, for comparison, int8 as it ran before the int8 GEMM path: the
kernels within their decode caps (linear.MAX_ROWS rows, moe.fits tokens), past them the torch
reference, which dequantizes each weight to a new tensor on every call. The variants alternate round
by round so a shared machine's noise falls on all alike; each reports the median.
Legend: R rows (tokens), H hidden size, E experts, I intermediate size, V vocabulary.
"""

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

DEFAULT_ROWS = "1,16,64,256,1024"
# name -> (activation dtype, weights int8, run as before the int8 GEMM path instead of the chosen ops)
VARIANTS = {
    "bf16": ("bfloat16", False, False),
    "int8-bf16": ("bfloat16", True, False),
    "int8-bf16-before": ("bfloat16", True, True),
    "int8-fp32": ("float32", True, False),
    "int8-fp32-before": ("float32", True, True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H")
    parser.add_argument("--heads", type=int, default=8, help="query heads (q/k/v rows: (heads + 2 kv) x head-dim)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8, help="experts held E (top-2 routed)")
    parser.add_argument("--intermediate", type=int, default=3584, help="intermediate size held I")
    parser.add_argument("--vocab", type=int, default=32000, help="LM head rows V")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated row (token) counts")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per variant and row count")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")


def _cases(args: argparse.Namespace):
    """name -> (make(dtype, int8) -> weights, call(ops, x, weights, routing)) for the linear ops and the MoE."""
    import torch

    from mixserve.shards.quant.int8_weight import Int8Weight

    def weight(*shape: int):
        dense = torch.randn(*shape) * 0.02
        return {False: dense.bfloat16(), True: Int8Weight.quantize(dense)}

    qkv_rows = (args.heads + 2 * args.kv_heads) * args.head_dim
    moe = (
        weight(args.experts, 2 * args.intermediate, args.hidden),
        weight(args.experts, args.hidden, args.intermediate),
    )
    return {
        f"linear q/k/v {qkv_rows}x{args.hidden}": (weight(qkv_rows, args.hidden), None),
        f"LM head {args.vocab}x{args.hidden}": (weight(args.vocab, args.hidden), None),
        f"MoE {args.experts}x({args.hidden}, {args.intermediate}) top-2": moe,
    }


class _Before:
    """int8 as it ran before: the kernels within their decode caps, the torch reference past them."""

    @staticmethod
    def linear_rows(x, weight):
        from mixserve.shards.kernels import linear
        from mixserve.shards.ops import reference

        if x.shape[0] > linear.MAX_ROWS:
            return reference.linear_rows(x, weight)
        return linear.linear_rows(x.float(), weight).to(x.dtype)

    @staticmethod
    def fused_moe(hidden, w13, w2, weights, experts):
        from mixserve.shards.kernels import moe
        from mixserve.shards.ops import reference

        if not moe.fits(hidden.shape[0]):
            return reference.fused_moe(hidden, w13, w2, weights, experts)
        return moe.moe_experts(hidden.float(), w13, w2, weights, experts).to(hidden.dtype)


def _call(chosen, x, first, second, routing, ids):
    """The op of a case as a closure: a linear (second None) or the MoE."""
    if second is None:
        return lambda: chosen.linear_rows(x, first)
    return lambda: chosen.fused_moe(x, first, second, routing, ids)


def _measure(args: argparse.Namespace, rows: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    import torch

    from mixserve.shards import ops

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    results: dict[str, dict[int, dict[str, float]]] = {}
    for case, (first, second) in _cases(args).items():
        results[case] = {}
        for count in rows:
            x = torch.randn(count, args.hidden)
            routing, ids = torch.randn(count, args.experts).softmax(-1).topk(2)
            calls = {}
            for name, (dtype_name, int8, before) in VARIANTS.items():
                dtype = getattr(torch, dtype_name)
                chosen = _Before if before else ops.select("auto", cpu, dtype)
                pair = None if second is None else second[int8]
                calls[name] = (dtype, _call(chosen, x.to(dtype), first[int8], pair, routing, ids))
            times: dict[str, list[float]] = {name: [] for name in calls}
            for round_ in range(args.rounds + 1):
                for name, (dtype, call) in calls.items():
                    ops.select("auto", cpu, dtype)
                    started = time.perf_counter()
                    call()
                    if round_:  # the first round warms up (kernel loading, scratch growth)
                        times[name].append(time.perf_counter() - started)
            results[case][count] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            log_line = " ".join(f"{name}={ms:.2f}" for name, ms in results[case][count].items())
            logging.getLogger("mixserve.bench").warning("case=%r rows=%d %s", case, count, log_line)
    ops.select("auto", cpu, torch.float32)
    return results


def markdown(results: dict[str, dict[int, dict[str, float]]], rounds: int) -> str:
    """One table per op: median ms per variant and the int8 variants' speed against bf16."""
    lines = [f"median ms of {rounds} alternating calls, one thread; speed = bf16 ms / variant ms"]
    for case, by_rows in results.items():
        lines += [
            "",
            f"**{case}**",
            "",
            "| rows | bf16 ms | int8 (bf16 act.) ms | speed | int8 before ms | speed "
            "| int8 (fp32 act.) ms | speed | int8 fp32 before ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for count, ms in by_rows.items():
            bf16 = ms["bf16"]
            lines.append(
                f"| {count} | {bf16:.2f} | {ms['int8-bf16']:.2f} | {bf16 / ms['int8-bf16']:.2f}x "
                f"| {ms['int8-bf16-before']:.2f} | {bf16 / ms['int8-bf16-before']:.2f}x "
                f"| {ms['int8-fp32']:.2f} | {bf16 / ms['int8-fp32']:.2f}x | {ms['int8-fp32-before']:.2f} |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s bench %(levelname)s %(message)s")
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            results = _measure(args, rows)
    finally:
        torch.set_num_threads(threads)
    sys.stdout.write(markdown(results, args.rounds) + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps({"rounds": args.rounds, "rows": rows, "results": results}, indent=2))
    return 0
