"""Time the C kernels' bf16 and int8 products at several row counts: linear_rows (the trained demo's LM
head slice at 2 ranks) and moe_experts (its experts, one of 2 ranks); the results are saved to the file
given, for comparing two builds' bits. `python rows.py OUT.pt [bf16|int8]`."""
import sys, time, json, torch
torch.set_num_threads(1)
from mixserve.shards.kernels import linear, moe
torch.manual_seed(0)
H, I, E, V = 512, 1024, 8, 4096  # demo-trained per rank of 2: hidden 512, experts 1024/2, vocab 8192/2
from mixserve.shards.quant.int8_weight import Int8Weight
kind = sys.argv[2] if len(sys.argv) > 2 else "bf16"
head = torch.randn(V, H) * 0.05
w13 = torch.randn(E, I, H) * 0.05  # [E, 2I/2, H] at 2 ranks
w2 = torch.randn(E, H, I // 2) * 0.05
if kind == "bf16":
    head, w13, w2 = head.bfloat16(), w13.bfloat16(), w2.bfloat16()
else:
    head, w13, w2 = Int8Weight.quantize(head), Int8Weight.quantize(w13), Int8Weight.quantize(w2)
def best(fn, n=15):
    fn(); t = []
    for _ in range(n):
        s = time.perf_counter(); fn(); t.append(time.perf_counter() - s)
    return min(t)
out = {}
for R in (1, 2, 3, 4, 8, 16, 64, 128):
    x = torch.randn(R, H)
    y = linear.linear_rows(x, head)
    out[f"head R={R}"] = (best(lambda: linear.linear_rows(x, head)) * 1e3, y)
    weights = torch.rand(R, 2); experts = torch.randint(0, E, (R, 2))
    experts[:, 1] = (experts[:, 0] + 1) % E
    m = moe.moe_experts(x, w13, w2, weights, experts)
    out[f"moe T={R}"] = (best(lambda: moe.moe_experts(x, w13, w2, weights, experts)) * 1e3, m)
torch.save({k: v[1] for k, v in out.items()}, sys.argv[1])
print(json.dumps({k: round(v[0], 3) for k, v in out.items()}))
