# linear_rows at 1-40 rows against torch (bf16-rounded inputs): time, error, and whether every row alone has the bits it has among the others.
# Run twice: as is (the tiles for the shapes of 2 MiB and K >= 512) and with MIXSERVE_KERNEL_CFLAGS=-mno-amx-tile.
import torch, time, statistics, sys
torch.set_num_threads(1)
from mixserve.shards.kernels import linear
torch.manual_seed(0)
for (N, K) in ((3584, 1024), (1024, 1792), (16000, 1024), (8192, 256)):
  if K % 32: continue
  W = (torch.randn(N, K) * 0.05).to(torch.bfloat16)
  for r in (1, 2, 4, 8, 16, 17, 32, 40):
    x = torch.randn(r, K)
    ref = (x.to(torch.bfloat16).float() @ W.float().T)
    out = linear.linear_rows(x, W)
    err = (out - ref).abs().max().item()
    single = torch.cat([linear.linear_rows(x[i:i+1].contiguous(), W) for i in range(r)])
    same = torch.equal(single, out)
    for _ in range(10): linear.linear_rows(x, W)
    ts = []
    for _ in range(100):
        t = time.perf_counter(); linear.linear_rows(x, W); ts.append(time.perf_counter() - t)
    m = statistics.median(ts) * 1e6
    print((N, K), r, f"{m:.0f} us", f"{W.numel()*2/m/1e3:.1f} GB/s", f"err {err:.2e}", "same-bits" if same else "DIFFER")
