"""In process, one thread: a bf16 model's int8 linear (linear.linear_rows) with the codes widened to fp32
against fp32 x (int8_bf16_activations off: what a bf16 model's codes took on AVX2 before) and with x
quantized to 15 bits in AVX2's int16 multiply-add (on), each the fastest of 20 calls after one, alternating.
Shapes: the demo's LM head and expert slices at one of two ranks, and Mixtral-8x7B's w1 at one rank.
Run from the repository root: python benchmarks/results/avx2-epyc-demo/avx2-int8-maddwd/rows.py"""

import ctypes

import torch

from mixserve.benchmarks.roofline import best_seconds
from mixserve.shards import ops
from mixserve.shards.kernels import linear, native
from mixserve.shards.quant.int8_weight import Int8Weight

torch.set_num_threads(1)
torch.manual_seed(0)
ops.select("native", torch.device("cpu"), torch.float32)
lib = native.load("moe")
print(
    "int16 dot products:",
    bool(lib.moe_int8_int16_dot_products()),
    "takes K 512:",
    bool(lib.moe_int8_int16_takes(ctypes.c_int64(512))),
)


def fastest(run, times: int = 20) -> float:
    return best_seconds(run, times) * 1e3


for n, k, name in (
    (16000, 512, "demo LM head"),
    (2048, 512, "demo w1+w3"),
    (512, 1024, "demo w2"),
    (14336, 4096, "8x7B w1"),
):
    weight = Int8Weight.quantize(torch.randn(n, k))
    for rows in (1, 2, 8, 32, 128):
        x = torch.randn(rows, k).bfloat16().float()
        native.set_int8_bf16_activations(False)
        widened = fastest(lambda x=x, weight=weight: linear.linear_rows(x, weight))
        native.set_int8_bf16_activations(True)
        int16 = fastest(lambda x=x, weight=weight: linear.linear_rows(x, weight))
        native.set_int8_bf16_activations(False)
        print(f"{name} [{n}, {k}] rows {rows}: widened {widened:.3f} ms, int16 {int16:.3f} ms, {widened / int16:.2f}x")
