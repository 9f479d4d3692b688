# draw_micro.py: sample()'s time a call on one core for sampled rows (and greedy, for scale), fp32 logits
# of randn * 3 (the nucleus of top_p 0.95 holds thousands of tokens: the cut's work is real).
#     python draw_micro.py LABEL            (PYTHONPATH=<worktree> for other code)
import sys, time
import torch
from mixserve.shards.sampling import sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.token_history import TokenHistory

torch.set_num_threads(1)
CASES = {
    "greedy": dict(temperature=0.0),
    "t0.8": dict(temperature=0.8, seed=1),
    "t0.8 p0.95": dict(temperature=0.8, top_p=0.95, seed=1),
    "t1 k50 p0.95": dict(temperature=1.0, top_k=50, top_p=0.95, seed=1),
}
for vocab in (8192, 32000):
    for batch in (1, 4, 32):
        logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch)) * 3
        for name, settings in CASES.items():
            params = [SamplingParams(**settings)] * batch
            histories = [TokenHistory() for _ in range(batch)]
            keys = list(range(batch))
            n = max(20, 3000 // batch)
            for _ in range(10):
                sample(logits, params, histories, keys)
            began = time.perf_counter()
            for _ in range(n):
                sample(logits, params, histories, keys)
            us = (time.perf_counter() - began) / n * 1e6
            print(f"{sys.argv[1]}\tV={vocab}\tB={batch}\t{name}\t{us:.0f} us")
