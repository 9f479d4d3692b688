import time, torch, sys, random
model_dir = sys.argv[1]; dtype = getattr(torch, sys.argv[2])
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling import SamplingParams
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.kernels import decoder_layer, moe
torch.set_num_threads(1)
p = ParallelConfig(); g = TensorParallelGroup(p)
m = load_model(model_dir, p, g, dtype, torch.device("cpu"))
B = 16
r = ModelRunner(m, p, g, torch.device("cpu"), dtype, B); r.allocate_cache(64)
table = list(range(32))
def st(tokens, start):
    return SequenceStep(1, tokens, start, [table[q // B] * B + q % B for q in range(start, start + len(tokens))], table, True, SamplingParams())
vocab = m.config.vocab_size
def pf(n, seed):
    rnd = random.Random(seed)
    prompt = [rnd.randrange(5, vocab) for _ in range(n)]
    t = time.perf_counter(); r.step([st(prompt, 0)]); return (time.perf_counter() - t) * 1e3
