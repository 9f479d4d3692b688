"""One rank of a real tensor-parallel group, for tests: prefill prompts, decode greedily, save logits.

Run as `python tests/tp_worker.py MODEL_DIR OUT_FILE PROMPTS_JSON DECODE_STEPS RUNS_JSON` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (as torchrun would). RUNS_JSON lists the runs, one after
another in the same process group (a group's processes import torch once for all of them): each a name
and its collectives (auto, shm or torch), how the experts are split (tp or ep) and `--cuda-graphs`. For
each run, rank 0 writes a torch file (`OUT_FILE.NAME.rankR`) with the logits of every step, the greedy
tokens, and each rank writes its weight shapes/bytes and what `ModelRunner.step` chose (token,
log-probability) for the same prompts as new sequences: all plain greedy (each rank's vocabulary slice
combined without gathering the logits), then with one sequence asking for alternatives (the gathered path).
"""

import json
import os
import sys

import torch

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import close_process_group, init_process_group, tensor_parallel_group
from mixserve.shards.kernels import decoder_stack
from mixserve.shards.loader import load_model, weight_bytes
from mixserve.shards.memory import StepLimits, size_kv_cache
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

BLOCK_SIZE = 4


def main() -> None:
    model_dir, out_file, prompts_json, decode_steps, runs_json = sys.argv[1:6]
    torch.set_num_threads(1)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu")
    init_process_group(ParallelConfig(rank, world_size), device)
    for name, collectives, moe_parallel, graphs in json.loads(runs_json):
        parallel = ParallelConfig(rank, world_size, moe_parallel)
        record = run(model_dir, parallel, collectives, graphs, json.loads(prompts_json), int(decode_steps))
        torch.save(record, f"{out_file}.{name}.rank{rank}")
    close_process_group()


def run(model_dir: str, parallel: ParallelConfig, collectives: str, graphs: str, prompts, decode_steps: int) -> dict:
    """One run's record (the module's docstring)."""
    device = torch.device("cpu")
    group = tensor_parallel_group(parallel, device, collectives)
    model = load_model(model_dir, parallel, group, torch.float32, device)
    runner = ModelRunner(model, parallel, group, device, torch.float32, BLOCK_SIZE, graphs)
    # 256 blocks for the steps below (and, with the graphs eager, the graph runner's scratch block
    # and buckets up to 4 sequences).
    assert size_kv_cache(runner, StepLimits(64, 4, 128), 0, 256, 1 << 30).num_blocks == 256
    greedy = SamplingParams(temperature=0.0)
    tables = [list(range(i * 40, (i + 1) * 40)) for i in range(len(prompts))]

    def slots(seq: int, start: int, n: int) -> list[int]:
        return [tables[seq][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + n)]

    seqs = [list(p) for p in prompts]
    steps = [SequenceStep(i, p, 0, slots(i, 0, len(p)), tables[i], True, greedy) for i, p in enumerate(seqs)]
    # Decode steps whose layers ran as one C call, all-reducing over shared memory in C.
    stack_runs = []
    real_run = decoder_stack.run
    decoder_stack.run = lambda *a: stack_runs.append(a[2] is not None) or real_run(*a)
    all_logits = []
    for _ in range(decode_steps + 1):
        all_logits.append(runner.forward(steps))
        tokens = all_logits[-1].argmax(dim=-1).tolist()
        for i, t in enumerate(tokens):
            seqs[i].append(t)
        steps = [
            SequenceStep(i, [s[-1]], len(s) - 1, slots(i, len(s) - 1, 1), tables[i], True, None)
            for i, s in enumerate(seqs)
        ]
    stepped = {}
    for case, top_n in (("plain", 0), ("alternatives", 2)):
        runner.release(list(range(100, 100 + len(prompts))))
        params = [greedy] * len(prompts)
        params[-1] = SamplingParams(temperature=0.0, top_n_tokens=top_n)
        grown = [list(p) for p in prompts]
        steps = [
            SequenceStep(100 + i, p, 0, slots(i, 0, len(p)), tables[i], True, params[i]) for i, p in enumerate(grown)
        ]
        chosen = []
        for _ in range(4):
            results = runner.step(steps)
            chosen.append([(r.token_id, r.logprob) for r in results])
            for i, r in enumerate(results):
                grown[i].append(r.token_id)
            steps = [
                SequenceStep(100 + i, [s[-1]], len(s) - 1, slots(i, len(s) - 1, 1), tables[i], True, None)
                for i, s in enumerate(grown)
            ]
        stepped[case] = chosen
    decoder_stack.run = real_run
    shapes = {name: (list(p.shape), p.numel() * p.element_size()) for name, p in model.named_parameters()}
    record = {"seqs": seqs, "stepped": stepped, "shapes": shapes, "weight_bytes": weight_bytes(model)}
    record["shm_stack_runs"] = sum(stack_runs)
    if parallel.rank == 0:
        record["logits"] = torch.stack(all_logits)
    return record


if __name__ == "__main__":
    main()
