# norm_ab.py: a one-shard bf16 decode run of the trained demo in-process (prefill 128 tokens, then 127 decode
# steps through multi_step.decode_steps), its final norm in torch's ops (before 001df40) or in C, alternating
# runs in one process; prints the median ms a step of each.
import statistics, dataclasses, time, torch
from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.multi_step import decode_steps
from mixserve.shards.ops import reference
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

torch.set_num_threads(1)
D, BLOCK, N = "/root/.cache/mixserve/demo-trained", 16, 128
parallel = ParallelConfig()
group = TensorParallelGroup(parallel)
model = load_model(D, parallel, group, dtype=torch.bfloat16)
ops.select("auto", torch.device("cpu"), torch.bfloat16)
runner = ModelRunner(model, parallel, group, torch.device("cpu"), torch.bfloat16, BLOCK)
runner.allocate_cache(64)
greedy, table = SamplingParams(temperature=0.0), list(range(17))


def ms_per_step(seq_id: int) -> float:
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(N)]
    first = runner.step([SequenceStep(seq_id, list(range(5, 5 + N)), 0, slots, table, True, greedy)])[0]
    step = SequenceStep(seq_id, [first.token_id], N, [table[N // BLOCK] * BLOCK + N % BLOCK], table, True, greedy)
    started, steps = time.perf_counter(), 0
    for _ in decode_steps(runner, [step], N - 1, lambda: False):
        steps += 1
    elapsed = time.perf_counter() - started
    runner.release([seq_id])
    return elapsed / steps * 1e3


in_c = ops.current()
variants = {"torch norm": dataclasses.replace(in_c, rms_norm=reference.rms_norm), "C norm": in_c}
for i in range(3):
    ms_per_step(1000 + i)
times = {name: [] for name in variants}
for i in range(16):
    for name in variants if i % 2 else reversed(list(variants)):
        ops._current[:] = [variants[name]]
        times[name].append(ms_per_step(2 * i + (name == "C norm")))
for name, values in times.items():
    print(f"{name}: median {statistics.median(values):.3f} ms a step over {len(values)} runs")
print(f"C / torch: {statistics.median(times['C norm']) / statistics.median(times['torch norm']):.3f}")
