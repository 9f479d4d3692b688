"""One rank of a real tensor-parallel group, for tests: prefill prompts, decode greedily, save logits.

Run as `python tests/tp_worker.py MODEL_DIR OUT_FILE PROMPTS_JSON DECODE_STEPS` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (as torchrun would); TP_COLLECTIVES and TP_MOE_PARALLEL
(tp or ep) pick the collectives and how the experts are split. Rank 0 writes a torch file
with the logits of every step, the greedy tokens, and each rank writes its weight shapes/bytes and
what `ModelRunner.step` chose (token, log-probability) for the same prompts as new sequences: all
plain greedy (each rank's vocabulary slice combined without gathering the logits), then with one
sequence asking for alternatives (the gathered path).
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
    model_dir, out_file, prompts_json, decode_steps = sys.argv[1:5]
    torch.set_num_threads(1)
    parallel = ParallelConfig(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ.get("TP_MOE_PARALLEL", "tp")
    )
    device = torch.device("cpu")
    init_process_group(parallel, device)
    group = tensor_parallel_group(parallel, device, os.environ.get("TP_COLLECTIVES", "auto"))
    model = load_model(model_dir, parallel, group, torch.float32, device)
    graphs = os.environ.get("TP_CUDA_GRAPHS", "auto")
    runner = ModelRunner(model, parallel, group, device, torch.float32, BLOCK_SIZE, graphs)
    # 256 blocks for the steps below (and, with TP_CUDA_GRAPHS=eager, the graph runner's scratch block
    # and buckets up to 4 sequences).
    assert size_kv_cache(runner, StepLimits(64, 4, 128), 0, 256, 1 << 30).num_blocks == 256
    prompts = json.loads(prompts_json)
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
    for _ in range(int(decode_steps) + 1):
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
    shapes = {name: (list(p.shape), p.numel() * p.element_size()) for name, p in model.named_parameters()}
    record = {"seqs": seqs, "stepped": stepped, "shapes": shapes, "weight_bytes": weight_bytes(model)}
    record["shm_stack_runs"] = sum(stack_runs)
    if parallel.rank == 0:
        record["logits"] = torch.stack(all_logits)
    torch.save(record, f"{out_file}.rank{parallel.rank}")
    close_process_group()


if __name__ == "__main__":
    main()
