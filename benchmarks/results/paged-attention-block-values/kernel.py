"""The paged decode attention kernel alone: one sequence, its context in randomly ordered blocks of 16, best
of 50 calls, one thread; prints the time, the K and V bytes a second and the time a context token, fp32 and bf16
KV. `H=8 KV=4 D=32 CTX=4000 python kernel.py` (the defaults: the demo at one shard), PYTHONPATH at the tree."""
import time, torch, sys, os
torch.set_num_threads(1)
from mixserve.shards.kernels import native
native.select("auto")
from mixserve.shards.kernels.paged_attention import paged_decode_attention
from mixserve.benchmarks.roofline import best_seconds
H, KV, D, S = int(os.environ.get("H", 8)), int(os.environ.get("KV", 4)), int(os.environ.get("D", 32)), 16
ctx = int(os.environ.get("CTX", 4000))
for dtype in (torch.float32, torch.bfloat16):
    N = (ctx + S - 1) // S
    k = torch.randn(N, S, KV, D).to(dtype); v = torch.randn(N, S, KV, D).to(dtype)
    perm = torch.randperm(N)
    tables = perm.unsqueeze(0); lens = torch.tensor([ctx])
    q = torch.randn(1, H, D)
    t = best_seconds(lambda: paged_decode_attention(q, (k, v), tables, lens, D ** -0.5, None), 50)
    by = 2 * ctx * KV * D * k.element_size()
    print(dtype, f"{t*1e6:.0f} us, {by/t/1e9:.1f} GB/s, {t/ctx*1e9:.0f} ns/token")
