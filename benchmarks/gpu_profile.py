"""`python -m mixserve.benchmarks.gpu_profile OUT`: where one Mixtral-8x7B rank's decode layer spends its
time on a GPU, kernel by kernel, and the fused MoE's tiles at decode sizes; `gpu_run.sh` runs it after
`bench gpu`.

A. The layer's Triton path (gpu_layer.triton_layer) at batch 1, 8 and 64, context 1024: each kernel's
   time per step from torch.profiler (eager: the same kernels a graph replays), against the step's
   graph replay (the difference is launch gaps).
B. `fused_moe` alone in a CUDA graph at 1, 2, 4, 8, 16 and 64 tokens for the default tiles and a few
   others (moe.block_config patched, tiles that fit an A100), and the expert alignment alone, against
   the floor of reading the experts hit once at the copy bandwidth measured in the same run. Tiles
   compare within one size of one run (the routing, so the experts hit, is random per size).

Writes profile.md and profile.json to OUT. `--dry-run` runs the same code at tiny shapes on the CPU
(Triton interpreted, CPU profiler, a handful of tiles): a check of the script, not a measurement. The
record of the first runs, and what they changed, is benchmarks/results/gpu-decode-profile.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Tiles besides the default, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), by tokens: the best of the
# first sweeps and their neighbours, each within an A100's shared memory in bf16.
SMALL_TILES = [(16, 32, 128, 4, 5), (16, 32, 256, 4, 5), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3)]
TILES = {1: SMALL_TILES, 2: SMALL_TILES, 4: SMALL_TILES, 8: SMALL_TILES, 16: SMALL_TILES}
TILES[64] = [(16, 64, 128, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 64, 8, 3)]
DECODE_BATCHES = (1, 8, 64)


def replay_ms(fn, device, reps: int = 50) -> float:
    """fn's time as a CUDA graph replay: median of 5 rounds of `reps` replays (eager, once, on the CPU)."""
    import torch

    from mixserve.benchmarks.gpu_kernels import capture_graph

    run, _ = capture_graph(fn, device)
    if device.type != "cuda":
        began = time.perf_counter()
        run()
        return (time.perf_counter() - began) * 1e3
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / reps)
    return statistics.median(rounds)


def kernel_breakdown(shapes, weights, batch: int, context: int, dtype, device) -> dict:
    """Part A for one batch: the step's graph time and each kernel's time per step, largest first."""
    import torch

    from mixserve.benchmarks.gpu_layer import decode_batch, random_pools, triton_layer

    step = decode_batch(shapes, batch, context, dtype, device)
    cache = random_pools(shapes, step.block_tables.numel(), dtype, device)

    def layer():
        return triton_layer(shapes, weights, cache, step)

    graph_ms = replay_ms(layer, device)
    on_gpu = device.type == "cuda"
    iterations = 20 if on_gpu else 1
    layer()
    if on_gpu:
        torch.cuda.synchronize()
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(iterations):
            layer()
        if on_gpu:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": event.key[:100], "us": us / iterations, "count": event.count // iterations})
    rows.sort(key=lambda row: -row["us"])
    return {"batch": batch, "context": context, "graph_us": graph_ms * 1e3, "rows": rows}


def moe_tiles(shapes, weights, tokens: int, tiles: list[tuple], dtype, device, bandwidth_gb_s: float) -> dict:
    """Part B for one size: fused_moe's graph time with the default tiles and each of `tiles`."""
    import torch

    from mixserve.shards.ops import reference
    from mixserve.shards.triton import moe
    from mixserve.shards.triton.moe_align import align_pairs

    hidden = torch.randn(tokens, shapes.hidden, device=device).to(dtype)
    routing, experts = reference.topk_softmax(torch.nn.functional.linear(hidden, weights.gate), shapes.top_k)
    hit = len(set(experts.flatten().tolist()))
    nbytes = hit * 3 * shapes.hidden * shapes.inter * dtype.itemsize
    default_config = moe.block_config
    default = default_config(tokens * shapes.top_k, shapes.experts, dtype)
    rows = []
    try:
        for tile in [None, *tiles]:
            if tile is not None:
                moe.block_config = lambda *args, tile=tile: moe.BlockConfig(*tile)
            name = f"default {tuple(getattr(default, f) for f in default.__slots__)}" if tile is None else str(tile)
            try:
                us = replay_ms(lambda: moe.fused_moe(hidden, weights.w13, weights.w2, routing, experts), device) * 1e3
                rows.append({"tile": name, "us": us})
            except Exception as error:  # noqa: BLE001 - a tile the device cannot take is recorded
                rows.append({"tile": name, "us": None, "error": f"{type(error).__name__}: {error}"[:160]})
    finally:
        moe.block_config = default_config
    align_us = replay_ms(lambda: align_pairs(experts, shapes.experts, default.block_m).sorted_pairs, device) * 1e3
    # Reading the experts once at the copy rate (which counts read + write, as this floor's bytes are read).
    floor_us = nbytes / bandwidth_gb_s / 1e3
    return {
        "tokens": tokens,
        "experts_hit": hit,
        "bytes": nbytes,
        "floor_us": floor_us,
        "align_us": align_us,
        "rows": rows,
    }


def profile_markdown(result: dict) -> str:
    lines = [f"# Decode layer and fused MoE on {result['device']} ({result['dtype']})", ""]
    lines += [f"- shapes (one rank): {result['shapes']}", f"- copy bandwidth: {result['bandwidth_gb_s']:.0f} GB/s", ""]
    for case in result["kernels"]:
        busy = sum(row["us"] for row in case["rows"])
        lines += [
            f"## Decode batch {case['batch']}, context {case['context']}: graph replay {case['graph_us']:.1f} us, "
            f"kernels {busy:.1f} us",
            "",
            "| us a step | launches | kernel |",
            "|---|---|---|",
        ]
        lines += [f"| {row['us']:.1f} | {row['count']} | `{row['kernel']}` |" for row in case["rows"][:25]]
        lines.append("")
    for size in result["moe"]:
        lines += [
            f"## fused_moe, {size['tokens']} tokens: {size['experts_hit']} experts hit, {size['bytes'] / 1e6:.0f} MB, "
            f"floor {size['floor_us']:.1f} us, alignment alone {size['align_us']:.1f} us",
            "",
            "| tile (M, N, K, warps, stages) | us |",
            "|---|---|",
        ]
        ranked = sorted(size["rows"], key=lambda row: row["us"] if row["us"] is not None else float("inf"))
        lines += [f"| {row['tile']} | {row.get('error') or format(row['us'], '.1f')} |" for row in ranked]
        lines.append("")
    return "\n".join(lines)


def run(out: Path, dry_run: bool) -> dict:
    import torch

    from mixserve.benchmarks.gpu_kernels import measure_bandwidth
    from mixserve.benchmarks.gpu_layer import MIXTRAL_8X7B_RANK, TINY_RANK, LayerWeights

    device = torch.device("cpu" if dry_run else "cuda")
    shapes, dtype = (TINY_RANK, torch.float32) if dry_run else (MIXTRAL_8X7B_RANK, torch.bfloat16)
    context = 17 if dry_run else 1024
    torch.manual_seed(0)
    result = {
        "device": "CPU (dry run)" if dry_run else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": {k: getattr(shapes, k) for k in shapes.__dataclass_fields__},
        "bandwidth_gb_s": measure_bandwidth(device, 2**24 if dry_run else 2 * 2**30)["gb_s"],
    }
    weights = LayerWeights.random(shapes, 4096 if not dry_run else 64, dtype, device)
    batches = DECODE_BATCHES[:1] if dry_run else DECODE_BATCHES
    result["kernels"] = [kernel_breakdown(shapes, weights, b, context, dtype, device) for b in batches]
    sizes = {1: TILES[1][:1]} if dry_run else TILES
    result["moe"] = [
        moe_tiles(shapes, weights, tokens, tiles, dtype, device, result["bandwidth_gb_s"])
        for tokens, tiles in sizes.items()
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "profile.md").write_text(profile_markdown(result) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixserve.benchmarks.gpu_profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="directory for profile.md and profile.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    run(args.out, args.dry_run)
    sys.stdout.write((args.out / "profile.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
