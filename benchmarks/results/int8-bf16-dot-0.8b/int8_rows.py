# int8_rows.py: the C kernel's y = x W^T (linear_rows) over a 3584 x 1024 weight (an expert's down/up size of
# the 0.8B shape on one rank) in bf16 and int8, 1-128 rows, one thread, alternating; median of 30 each.
# `python int8_rows.py float32`: an fp32 model's mode (int8 codes widened to fp32 against fp32 x);
# `python int8_rows.py bfloat16`: a bf16 model's (codes made bf16, x rounded to bf16, bf16's dot product).
import statistics, sys, time, torch
from mixserve.shards import ops
from mixserve.shards.kernels import linear
from mixserve.shards.quant.int8_weight import Int8Weight
torch.set_num_threads(1)
dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
ops.select("native", torch.device("cpu"), dtype)
w = torch.randn(3584, 1024)
weights = {"bf16": w.bfloat16(), "int8": Int8Weight.quantize(w)}
for rows in (1, 8, 32, 128):
    x = torch.randn(rows, 1024)
    times = {name: [] for name in weights}
    for _ in range(30):
        for name, weight in weights.items():
            started = time.perf_counter()
            linear.linear_rows(x, weight)
            times[name].append(time.perf_counter() - started)
    print(f"{dtype} model, {rows} rows: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.3f} ms" for n, t in times.items()))
