"""One prefill step of one sequence in process, one rank, one thread, through the decoder layer kernel
(or torch's layers), as the warm-up's ladder times it (shards/kernel_tokens.py): min and median ms.

usage: PYTHONPATH=<tree>:<tree>/proto python prefill.py MODEL_DIR DTYPE TOKENS [kernel|torch] [SECONDS]
(a MODEL_DIR holding only config.json loads dummy weights)."""

import os
import sys
import time

import torch

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernel_tokens import _allow, _prefill
from mixserve.shards.kernels import moe
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner

torch.set_num_threads(1)
model_dir, dtype, tokens = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
path = sys.argv[4] if len(sys.argv) > 4 else "kernel"
seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
parallel = ParallelConfig()
group = TensorParallelGroup(parallel)
ops.select("auto", torch.device("cpu"), dtype)
with torch.inference_mode():
    load_format = "auto" if any(f.endswith(".safetensors") for f in os.listdir(model_dir)) else "dummy"
    model = load_model(model_dir, parallel, group, dtype=dtype, load_format=load_format)
    runner = ModelRunner(model, parallel, group, torch.device("cpu"), dtype, 16)
    runner.allocate_cache(512)
    cap = moe.TIMED_MAX_TOKENS
    _allow(cap, cap if path == "kernel" else 0)
    for _ in range(3):
        _prefill(runner, tokens)
    times, end = [], time.perf_counter() + seconds
    while len(times) < 10 or time.perf_counter() < end:
        started = time.perf_counter()
        _prefill(runner, tokens)
        times.append(time.perf_counter() - started)
times.sort()
median = times[len(times) // 2]
print(f"{path} {sys.argv[2]} {tokens} tokens: min {times[0] * 1e3:.2f} p50 {median * 1e3:.2f} ms n={len(times)}")
