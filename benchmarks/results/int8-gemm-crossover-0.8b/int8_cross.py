# int8_cross.py: where a bf16 model's int8 steps should leave the C kernels (codes in bf16's dot product)
# for the dequantize-then-GEMM path (shards/ops/int8_gemm.py, oneDNN's bf16 GEMM), on the 0.8B shape's
# weights as one of two tensor-parallel ranks holds them: experts w13 [8, 3584, 1024], w2 [8, 1024, 1792]
# (top-2 of 8 routed at random), and the int8 linears qkv [768, 1024], o [1024, 512], LM head
# [16000, 1024]. One thread, both paths alternating; median of `reps` each; ratio = GEMM path / kernel
# (above 1: the kernel is faster).
import statistics, sys, time
import torch
from mixserve.shards import ops
from mixserve.shards.kernels import linear, moe
from mixserve.shards.ops import int8_gemm
from mixserve.shards.quant.int8_weight import Int8Weight

torch.set_num_threads(1)
torch.manual_seed(0)
ops.select("native", torch.device("cpu"), torch.bfloat16)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9


def timed(paths: dict, reps: int) -> dict:
    times = {name: [] for name in paths}
    for _ in range(reps):
        for name, fn in paths.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def quantized(*shape: int) -> Int8Weight:
    return Int8Weight.quantize(torch.randn(*shape) * 0.02)


w13, w2 = quantized(8, 3584, 1024), quantized(8, 1024, 1792)
print("MoE (tokens: kernel ms, GEMM path ms, ratio)")
for tokens in (16, 32, 48, 64, 96, 112, 129, 144, 160, 176, 192, 256):
    hidden = torch.randn(tokens, 1024).bfloat16()
    weights, experts = torch.randn(tokens, 8).softmax(-1).topk(2)
    h32, w32 = hidden.float(), weights.float()
    t = timed(
        {
            "kernel": lambda: moe.moe_experts(h32, w13, w2, w32, experts),
            "gemm": lambda: int8_gemm.fused_moe(hidden, w13, w2, weights.bfloat16(), experts),
        },
        reps,
    )
    print(f"  {tokens:4d}: {t['kernel']:8.3f} {t['gemm']:8.3f}  {t['gemm'] / t['kernel']:.2f}", flush=True)

for name, (n, k) in {"qkv": (768, 1024), "o": (1024, 512), "lm_head": (16000, 1024)}.items():
    weight = quantized(n, k)
    print(f"linear {name} [{n}, {k}] (rows: kernel ms, GEMM path ms, ratio)")
    for rows in (8, 16, 17, 24, 32, 40, 48, 56, 64, 80, 96, 112, 129):
        x = torch.randn(rows, k).bfloat16()
        x32 = x.float()
        t = timed(
            {
                "kernel": lambda: linear.linear_rows(x32, weight),
                "gemm": lambda: int8_gemm.linear_rows(x, weight),
            },
            reps,
        )
        print(f"  {rows:4d}: {t['kernel']:8.3f} {t['gemm']:8.3f}  {t['gemm'] / t['kernel']:.2f}", flush=True)
