"""The model runner in one process: mixed prefill/decode steps, step validation."""

import pytest
import torch

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import InvalidStep, OutOfCapacity, SequenceStep

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    return load_model(demo_dir, parallel, TensorParallelGroup(parallel))


def new_runner(model, num_blocks: int = 64) -> ModelRunner:
    parallel = ParallelConfig()
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.float32, BLOCK)
    runner.allocate_cache(num_blocks)
    return runner


def seq_step(seq_id, tokens, start, table, sample=True, sampling=GREEDY) -> SequenceStep:
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + len(tokens))]
    return SequenceStep(seq_id, tokens, start, slots, table, sample, sampling)


PROMPT_A = list(range(100, 116))  # prefilled in two chunks of 6 and 10
PROMPT_B = [1, 40, 41, 42, 43]
PROMPT_C = [1, 900, 901]
TABLES = {0: [3, 7, 1, 9, 11], 1: [2, 5, 13], 2: [4, 6]}


def test_mixed_step_equals_each_sequence_alone(model):
    batched = new_runner(model)
    batched.step([seq_step(1, PROMPT_B, 0, TABLES[1]), seq_step(2, PROMPT_C, 0, TABLES[2])])
    batched.step([seq_step(0, PROMPT_A[:6], 0, TABLES[0], sample=False)])
    mixed = [
        seq_step(0, PROMPT_A[6:], 6, TABLES[0]),
        seq_step(1, [7], len(PROMPT_B), TABLES[1], sampling=None),
        seq_step(2, [8], len(PROMPT_C), TABLES[2], sampling=None),
    ]
    together = batched.forward(mixed)

    alone = []
    for seq_id, prompt, step in zip((0, 1, 2), (PROMPT_A, PROMPT_B, PROMPT_C), mixed, strict=True):
        runner = new_runner(model)
        start = step.start_position
        runner.forward([seq_step(seq_id, prompt[:start] if seq_id == 0 else prompt, 0, TABLES[seq_id])])
        alone.append(runner.forward([step])[0])
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_one_prefill(model):
    whole = new_runner(model).forward([seq_step(0, PROMPT_A, 0, TABLES[0])])
    runner = new_runner(model)
    for start, end in ((0, 5), (5, 11), (11, 16)):
        logits = runner.forward([seq_step(0, PROMPT_A[start:end], start, TABLES[0])])
    torch.testing.assert_close(logits, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([], InvalidStep, "no sequences"),
        ([seq_step(5, [], 0, [0])], InvalidStep, "no tokens"),
        ([seq_step(5, [1, 2], 0, [0]), seq_step(5, [3], 0, [1])], InvalidStep, "twice"),
        ([SequenceStep(5, [1] * 9, 0, list(range(9)), [0, 1], True, GREEDY)], InvalidStep, "needs 3 blocks"),
        ([seq_step(5, [1, 2], 0, [63])], OutOfCapacity, "uses block 63"),
        ([seq_step(5, [10**6], 0, [0])], InvalidStep, "vocab size"),
        ([seq_step(5, [1], 0, [0], sampling=None)], InvalidStep, "no sampling parameters"),
    ],
)
def test_malformed_steps_are_refused_and_the_runner_keeps_working(model, bad, error, message):
    runner = new_runner(model, num_blocks=16)
    with pytest.raises(error, match=message):
        runner.step(bad)
    results = runner.step([seq_step(1, PROMPT_B, 0, TABLES[1])])
    assert results[0].seq_id == 1


def test_slot_mapping_must_match_the_block_table(model):
    runner = new_runner(model)
    step = seq_step(0, PROMPT_B, 0, TABLES[1])
    step.slot_mapping[2] += 1
    with pytest.raises(InvalidStep, match="slot_mapping"):
        runner.step([step])
