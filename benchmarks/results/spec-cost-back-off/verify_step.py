"""In-process: a batch-1 plain decode step against a k=3 verification step on the trained demo (bf16),
and where a verification step's time goes (cProfile)."""
import cProfile, pstats, random, statistics, sys, time, os
import torch
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner, SequenceStep
from mixserve.shards.sampling import SamplingParams
from mixserve.shards import ops

torch.set_num_threads(1)
DEMO = os.path.expanduser("~/.cache/mixserve/demo-93bc109d09c8")
BLOCK = 16
parallel = ParallelConfig()
group = TensorParallelGroup(parallel)
dtype = torch.bfloat16
model = load_model(DEMO, parallel, group, dtype, torch.device("cpu"))
runner = ModelRunner(model, parallel, group, torch.device("cpu"), dtype, BLOCK)
runner.allocate_cache(64)
table = list(range(32))
slot = lambda p: table[p // BLOCK] * BLOCK + p % BLOCK
rng = random.Random(0)
prompt = [1] + [rng.randrange(3, 8000) for _ in range(128)]
(r,) = runner.step([SequenceStep(1, prompt, 0, [slot(p) for p in range(len(prompt))], table, True, SamplingParams())])
pos = len(prompt)
last = r.token_id
K = int(sys.argv[1]) if len(sys.argv) > 1 else 3

def plain():
    return runner.step([SequenceStep(1, [last], pos, [slot(pos)], table, True, None)])

def verify():
    props = [rng.randrange(3, 8000) for _ in range(K)]
    return runner.step([SequenceStep(1, [last, *props], pos, [slot(pos + i) for i in range(K + 1)], table, True, None, num_proposed=K)])

def timed(f, n=300):
    out = []
    for _ in range(n):
        t = time.perf_counter(); f(); out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e6

for _ in range(50): plain(); verify()
tp, tv = [], []
for _ in range(5):
    tp.append(timed(plain)); tv.append(timed(verify))
print(f"plain {statistics.median(tp):.0f} us, verify k={K} {statistics.median(tv):.0f} us, ratio {statistics.median(tv)/statistics.median(tp):.2f}")
# forward alone
def fwd(n):
    steps = [SequenceStep(1, [last] + [5]*(n-1), pos, [slot(pos+i) for i in range(n)], table, True, None, num_proposed=n-1)]
    return lambda: runner.forward(steps)
for n in (1, 2, 4, 6):
    print(f"forward rows={n}: {timed(fwd(n)):.0f} us")
pr = cProfile.Profile(); pr.enable()
for _ in range(300): verify()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
