# ruff: noqa: E402
"""Where one Mixtral-8x7B rank's decode layer spends its time on the GPU, and the fused MoE's tiles at
decode sizes; then whether bf16's misses in gpu-20261204T1520Z's agreement are bf16's own.

    python benchmarks/results/gpu-decode-profile/decode_profile.py OUT_DIR    (repo root on PYTHONPATH)
    TILES=1 ...: only B, for 1, 2, 4, 8 and 16 tokens over the small-batch tiles that fit an A100
    DRY=1 ...: the same code on the CPU at the dry run's tiny shapes, Triton interpreted (a check of
    the script, not of anything it measures)

A. Per kernel, the layer's Triton path at batch 1, 8 and 64 (context 1024), from torch.profiler
   (eager; the same kernels the graph replays), against the graph replay's time.
B. fused_moe alone in a CUDA graph at 1, 8 and 64 tokens for a list of tiles (moe.block_config
   patched), and align_pairs alone: time and % of the copy bandwidth for the experts' bytes.
C. The served bf16 sequences of gpu-20261204T1520Z scored against transformers in fp32 and in bf16,
   and transformers bf16's own top-1 against fp32 on the same sequences.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

DRY = os.environ.get("DRY") == "1"
TILES = os.environ.get("TILES") == "1"
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from mixserve.benchmarks import gpu_agree
from mixserve.benchmarks.gpu_kernels import capture_graph, measure_bandwidth
from mixserve.benchmarks.gpu_layer import (
    MIXTRAL_8X7B_RANK,
    TINY_RANK,
    LayerWeights,
    decode_batch,
    random_pools,
    triton_layer,
)
from mixserve.shards.layers.moe import route
from mixserve.shards.triton import moe
from mixserve.shards.triton.moe_align import align_pairs

OUT = Path(sys.argv[1])
OUT.mkdir(parents=True, exist_ok=True)
S = TINY_RANK if DRY else MIXTRAL_8X7B_RANK
DEV = torch.device("cpu" if DRY else "cuda")
DT = torch.float32 if DRY else torch.bfloat16
CONTEXT = 17 if DRY else 1024
STARTED = time.monotonic()
result: dict = {}


def replay_ms(fn, reps: int = 50) -> float:
    """Median over 5 rounds of `reps` graph replays of fn, per replay."""
    run, _ = capture_graph(fn, DEV)
    if DRY:
        began = time.perf_counter()
        run()
        return (time.perf_counter() - began) * 1e3
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            run()
        b.record()
        b.synchronize()
        rounds.append(a.elapsed_time(b) / reps)
    return statistics.median(rounds)


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


bandwidth = measure_bandwidth(DEV, 2**24 if DRY else 2 * 2**30)["gb_s"]
result["bandwidth_gb_s"] = bandwidth
weights = LayerWeights.random(S, 4096, DT, DEV)

# A. per-kernel breakdown
result["kernels"] = {}
for batch in () if TILES else (1, 8, 64):
    step = decode_batch(S, batch, CONTEXT, DT, DEV)
    cache = random_pools(S, step.block_tables.numel(), DT, DEV)

    def layer(step=step, cache=cache):
        return triton_layer(S, weights, cache, step)

    graph = replay_ms(layer)
    for _ in range(1 if DRY else 3):
        layer()
    sync()
    iterations = 1 if DRY else 20
    activity = torch.profiler.ProfilerActivity.CPU if DRY else torch.profiler.ProfilerActivity.CUDA
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(iterations):
            layer()
        sync()
    rows = []
    for event in prof.key_averages():
        us = event.self_cpu_time_total if DRY else event.self_device_time_total
        if us > 0:
            rows.append((event.key[:90], us / iterations, event.count // iterations))
    rows.sort(key=lambda r: -r[1])
    busy = sum(r[1] for r in rows)
    result["kernels"][batch] = {"graph_us": graph * 1e3, "busy_us": busy, "rows": rows}
    print(f"\n== decode b{batch} c{CONTEXT}: graph replay {graph * 1e3:.1f} us, kernels busy {busy:.1f} us")
    for name, us, count in rows[:25]:
        print(f"{us:8.1f} us  x{count:<3d} {name}")

# B. fused_moe tiles
CONFIGS = {
    1: [(16, n, k, w, s) for n in (16, 32, 64, 128) for k in (64, 128, 256) for w, s in ((4, 3), (4, 5))]
    + [(16, 32, 128, 2, 4), (16, 64, 128, 8, 4), (16, 32, 256, 8, 3)],
    8: [(16, 32, 128, 4, 4), (16, 64, 128, 4, 3), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3), (16, 32, 256, 4, 3)],
    64: [(16, 64, 128, 4, 3), (32, 64, 64, 4, 3), (32, 64, 128, 4, 3), (32, 128, 64, 4, 3), (64, 128, 64, 8, 3)],
}
if TILES:
    small = [(16, 32, 128, 4, 4), (16, 32, 128, 4, 5), (16, 32, 256, 4, 3), (16, 32, 256, 4, 5), (16, 64, 128, 4, 4)]
    CONFIGS = dict.fromkeys((1, 2, 4, 8, 16), small)
default_config = moe.block_config
result["moe"] = {}
for tokens, configs in CONFIGS.items():
    if time.monotonic() - STARTED > 150 or (DRY and tokens > 1):
        print(f"(moe sweep at {tokens} tokens skipped: time)")
        continue
    hidden = torch.randn(tokens, S.hidden, device=DEV).to(DT)
    routing, experts = route(hidden, weights.gate, S.top_k)
    hit = len(set(experts.flatten().tolist()))
    nbytes = hit * 3 * S.hidden * S.inter * 2
    floor_us = nbytes / bandwidth / 1e3  # reading the experts once at the copy rate (read + write)
    align_us = replay_ms(lambda e=experts: align_pairs(e, S.experts, 16).sorted_pairs) * 1e3
    rows = []
    for config in [None, *configs][: 3 if DRY else None]:
        moe.block_config = default_config if config is None else (lambda *a, c=config: moe.BlockConfig(*c))
        try:
            us = replay_ms(lambda h=hidden, r=routing, e=experts: moe.fused_moe(h, weights.w13, weights.w2, r, e)) * 1e3
        except Exception as error:  # noqa: BLE001
            rows.append((str(config), None, f"{type(error).__name__}: {error}"[:120]))
            continue
        rows.append((str(config or f"default {default_config(tokens * 2, S.experts, DT)}"), us, None))
    moe.block_config = default_config
    result["moe"][tokens] = {
        "experts_hit": hit,
        "bytes": nbytes,
        "floor_us": floor_us,
        "align_us": align_us,
        "rows": rows,
    }
    print(
        f"\n== fused_moe {tokens} tokens: {hit} experts, {nbytes / 1e6:.0f} MB, floor {floor_us:.1f} us, align {align_us:.1f} us"
    )
    for name, us, error in sorted(rows, key=lambda r: r[1] or 1e9):
        print(f"{'error' if us is None else f'{us:8.1f} us'}  {name}  {error or ''}")

if TILES:
    (OUT / "tiles.json").write_text(json.dumps(result, indent=1))
    sys.exit(0)
# C. bf16 agreement baseline
RUN = Path("/tmp/gpudry3" if DRY else "benchmarks/results/gpu-20261204T1520Z")
served = json.loads((RUN / "gpu.json").read_text())["agreement"]["runs"]
sequences = next(run["sequences"] for run in served if run["dtype"] == ("float32" if DRY else "bfloat16"))
model_dir = gpu_agree.write_model(Path("/tmp/agree-model"), on_gpu=not DRY)
fp32 = gpu_agree.reference_model(model_dir, DEV)
result["agree"] = {"served_bf16_vs_fp32": gpu_agree.score(fp32, sequences, DEV, gpu_agree.TIE_GAP["bfloat16"])}
bf16 = gpu_agree.reference_model(model_dir, DEV).to(torch.bfloat16)
result["agree"]["served_bf16_vs_hf_bf16"] = gpu_agree.score(bf16, sequences, DEV, gpu_agree.TIE_GAP["bfloat16"])
# transformers bf16's own top-1 along the served sequences against fp32's there (gap in fp32's units)
positions, misses = 0, []
for index, seq in enumerate(sequences):
    ids = torch.tensor([seq["prompt"] + seq["generated"]], device=DEV)
    span = slice(len(seq["prompt"]) - 1, ids.shape[1] - 1)
    with torch.no_grad():
        ref = fp32(ids).logits[0, span].float()
        low = bf16(ids).logits[0, span].float()
    for pos, (a, b) in enumerate(zip(ref.argmax(-1).tolist(), low.argmax(-1).tolist(), strict=True)):
        positions += 1
        if a != b:
            misses.append((index, pos, round(float((ref[pos, a] - ref[pos, b]) / ref[pos].std()), 4)))
result["agree"]["hf_bf16_top1_vs_fp32"] = {"positions": positions, "misses": misses}
print(f"hf_bf16_top1_vs_fp32: top1 {positions - len(misses)}/{positions} misses {misses}")
for name, s in list(result["agree"].items())[:2]:
    print(
        f"{name}: top1 {s['top1_agree']}/{s['positions']} max gap {s['max_gap']:.3f} misses {[(m['prompt'], m['position'], m['gap']) for m in s['misses']]}"
    )
(OUT / "profile.json").write_text(json.dumps(result, indent=1))
print(f"done in {time.monotonic() - STARTED:.0f} s")
