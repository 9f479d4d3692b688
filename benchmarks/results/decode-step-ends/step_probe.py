"""In process, one rank: the median time of a greedy decode step (ModelRunner.step: the forward and the greedy
choice) at B sequences, on a checkpoint in bf16 (fp32 with --fp32), each sequence's context between 130 and
161 tokens (the steps cycle over those 32 positions, rewriting their slots). Run with the code to measure
first on PYTHONPATH; run.sh alternates two trees.

    python step_probe.py MODEL_DIR B [--fp32]
"""

import os
import random
import statistics
import sys
import time

import torch

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

torch.set_num_threads(1)
MODEL, BATCH = os.path.expanduser(sys.argv[1]), int(sys.argv[2])
DTYPE = torch.float32 if "--fp32" in sys.argv else torch.bfloat16
BLOCK, PROMPT, STEPS, ROUNDS = 16, 128, 200, 5
ops.select("auto", torch.device("cpu"), DTYPE)
parallel = ParallelConfig()
group = TensorParallelGroup(parallel)
model = load_model(MODEL, parallel, group, DTYPE, torch.device("cpu"))
runner = ModelRunner(model, parallel, group, torch.device("cpu"), DTYPE, BLOCK)
width = (PROMPT + 40) // BLOCK + 2
runner.allocate_cache(width * BATCH + 1)
tables = [list(range(1 + b * width, 1 + (b + 1) * width)) for b in range(BATCH)]


def slots(table: list[int], start: int, count: int) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + count)]


rng = random.Random(0)
last, steps_run = [], 0
for b, table in enumerate(tables):
    prompt = [1] + [rng.randrange(3, model.config.vocab_size) for _ in range(PROMPT)]
    (first,) = runner.step([SequenceStep(b, prompt, 0, slots(table, 0, len(prompt)), table, True, SamplingParams())])
    last.append(first.token_id)


def step() -> None:
    global steps_run
    position = PROMPT + 1 + steps_run % 32
    batch = [SequenceStep(b, [last[b]], position, slots(t, position, 1), t, True, None) for b, t in enumerate(tables)]
    results = runner.step(batch)
    last[:] = [r.token_id for r in results]
    steps_run += 1


for _ in range(STEPS):
    step()
medians = []
for _ in range(ROUNDS):
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    medians.append(statistics.median(times) * 1e6)
print(f"code={os.path.dirname(os.path.dirname(os.path.dirname(ops.__file__)))} B={BATCH} dtype={str(DTYPE).removeprefix('torch.')} step_us={statistics.median(medians):.0f} rounds={[round(m) for m in medians]}")
