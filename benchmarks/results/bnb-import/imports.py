"""Seconds a fresh process takes to import bitsandbytes and make its first LLM.int8 and nf4 layers (the
quantization and one call each, on the CPU), with torch.compile as bitsandbytes calls it at import
(`compiled`: what load_bitsandbytes did before) or as the identity during the import (`eager`: since),
alternating; and the steady milliseconds a call of each layer at 1 and 64 rows.

usage: python imports.py ROUNDS   (from any directory; mixserve importable)
"""

import subprocess
import sys

PROBE = r"""
import sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
t1 = time.perf_counter()
if sys.argv[1] == "compiled":
    import bitsandbytes
else:
    from mixserve.shards.quant.linear import load_bitsandbytes
    load_bitsandbytes()
t2 = time.perf_counter()
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.linear import quantize_linear
layers = {}
for mode in ("bitsandbytes", "bitsandbytes-nf4"):
    weight = torch.randn(1024, 256)
    layers[mode] = quantize_linear(weight, QuantizationConfig(mode), torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        layers[mode](torch.randn(1, 256))
t3 = time.perf_counter()
steady = []
with torch.inference_mode():
    for mode, layer in layers.items():
        for rows in (1, 64):
            x = torch.randn(rows, 256)
            for _ in range(5):
                layer(x)
            began = time.perf_counter()
            for _ in range(50):
                layer(x)
            steady.append(f"{mode}@{rows}={(time.perf_counter() - began) / 50 * 1e3:.3f}ms")
print(f"torch_s={t1 - t0:.2f} bitsandbytes_s={t2 - t1:.2f} first_layers_s={t3 - t2:.2f} "
      f"import_to_first_calls_s={t3 - t1:.2f} inductor={'torch._inductor.compile_fx' in sys.modules} "
      + " ".join(steady))
"""

for round_ in range(1, int(sys.argv[1]) + 1):
    for way in ("compiled", "eager"):
        done = subprocess.run([sys.executable, "-c", PROBE, way], capture_output=True, text=True, check=True)
        print(f"{way} round={round_} {done.stdout.strip()}", flush=True)
