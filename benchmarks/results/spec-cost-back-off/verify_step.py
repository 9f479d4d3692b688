"""In process, one rank: a batch-1 plain decode step against a verification step of K proposals on the
trained demo in bf16, the forward alone at 1, 2, 4 and 6 rows, and where a verification step's time goes
(cProfile).

    python verify_step.py 3 > verify-step-output.txt
"""

import cProfile
import os
import pstats
import random
import statistics
import sys
import time

import torch

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

torch.set_num_threads(1)
DEMO = os.path.expanduser("~/.cache/mixserve/demo-93bc109d09c8")
BLOCK = 16
K = int(sys.argv[1]) if len(sys.argv) > 1 else 3
parallel = ParallelConfig()
group = TensorParallelGroup(parallel)
model = load_model(DEMO, parallel, group, torch.bfloat16, torch.device("cpu"))
runner = ModelRunner(model, parallel, group, torch.device("cpu"), torch.bfloat16, BLOCK)
runner.allocate_cache(64)
table = list(range(32))


def slots(start: int, count: int) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + count)]


rng = random.Random(0)
prompt = [1] + [rng.randrange(3, 8000) for _ in range(128)]
(first,) = runner.step([SequenceStep(1, prompt, 0, slots(0, len(prompt)), table, True, SamplingParams())])
pos, last = len(prompt), first.token_id


def plain():
    runner.step([SequenceStep(1, [last], pos, slots(pos, 1), table, True, None)])


def verify():
    proposals = [rng.randrange(3, 8000) for _ in range(K)]
    runner.step([SequenceStep(1, [last, *proposals], pos, slots(pos, K + 1), table, True, None, num_proposed=K)])


def forward(rows: int):
    tokens = [last] + [5] * (rows - 1)
    steps = [SequenceStep(1, tokens, pos, slots(pos, rows), table, True, None, num_proposed=rows - 1)]
    return lambda: runner.forward(steps)


def timed(f, n: int = 300) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


for _ in range(50):
    plain()
    verify()
plains, verifies = [], []
for _ in range(5):
    plains.append(timed(plain))
    verifies.append(timed(verify))
p, v = statistics.median(plains), statistics.median(verifies)
print(f"plain {p:.0f} us, verify k={K} {v:.0f} us, ratio {v / p:.2f}")
for rows in (1, 2, 4, 6):
    print(f"forward rows={rows}: {timed(forward(rows)):.0f} us")
profile = cProfile.Profile()
profile.enable()
for _ in range(300):
    verify()
profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(12)
