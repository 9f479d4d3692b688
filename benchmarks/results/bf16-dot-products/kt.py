import time, torch
from mixserve.shards.kernels import linear, moe
torch.manual_seed(0); torch.set_num_threads(1)
w = torch.randn(8192, 256).to(torch.bfloat16)
w13 = (torch.randn(8, 1024, 256) * 0.1).to(torch.bfloat16); w2 = (torch.randn(8, 256, 512) * 0.1).to(torch.bfloat16)
def t(fn, n=2000):
    fn(); ts = []
    for _ in range(n):
        a = time.perf_counter(); fn(); ts.append(time.perf_counter() - a)
    ts.sort(); return ts[len(ts) // 2] * 1e6
out = []
for rows in (1, 6):
    x = torch.randn(rows, 256)
    out.append(f"lmhead r{rows} {t(lambda: linear.linear_rows(x, w)):.1f}")
    weights, experts = torch.rand(rows, 2), torch.randint(0, 8, (rows, 2))
    out.append(f"moe r{rows} {t(lambda: moe.moe_experts(x, w13, w2, weights, experts)):.1f}")
print(" | ".join(out))
