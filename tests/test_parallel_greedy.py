"""parallel_greedy in real groups: the token and log-probability of the whole row from each rank's
vocabulary slice, against argmax and log_softmax of the full logits."""

import json

import pytest
import torch

from child_processes import PYTHON, REPO, run_ranks
from mixserve.shards.parallel_greedy import is_plain_greedy
from mixserve.shards.sampling_params import SamplingParams

# Per group size, its runs: name, vocabulary, collectives, kernels. vocab 4 over 3 ranks: 2 rows each, rank 2
# holds only padding.
RUNS = {
    3: [["1001", 1001, "auto", "auto"], ["1001-torch-kernels", 1001, "auto", "torch"], ["padding", 4, "auto", "auto"]],
    2: [["64-torch", 64, "torch", "torch"]],
}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, list[dict]]:
    """Each run's records by rank: one process group a group size, its runs one after another."""
    out = tmp_path_factory.mktemp("greedy") / "greedy"
    found = {}
    for world_size, runs in RUNS.items():
        run_ranks([PYTHON, str(REPO / "tests" / "parallel_greedy_worker.py"), str(out), json.dumps(runs)], world_size)
        found |= {name: [torch.load(f"{out}.{name}.rank{r}") for r in range(world_size)] for name, *_ in runs}
    return found


@pytest.mark.parametrize(
    ("name", "world_size", "vocab"), [("1001", 3, 1001), ("64-torch", 2, 64), ("1001-torch-kernels", 3, 1001)]
)
@pytest.mark.slow
def test_slices_combine_to_the_full_rows_choice(records, name, world_size, vocab):
    records = records[name]
    logits = records[0]["logits"]
    expected_ids = logits.argmax(dim=-1)
    expected_logprobs = logits.log_softmax(dim=-1).gather(1, expected_ids[:, None]).squeeze(1)
    assert expected_ids[1] == -(-vocab // world_size) - 1 and expected_ids[2] == vocab - 1
    for record in records:
        ids, logprobs = record["chosen"]
        assert ids.tolist() == expected_ids.tolist()
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)
        assert record["with_nan"] is None, "a NaN on one rank must send every rank to the gathered path"
        # A grammar's mask applied to each slice keeps the fast path and picks the masked full row's argmax.
        masked = records[0]["masked_full"]
        assert record["masked"] is not None
        assert record["masked"][0].tolist() == masked.argmax(dim=-1).tolist()
        expected = masked.log_softmax(dim=-1).gather(1, masked.argmax(dim=-1)[:, None]).squeeze(1)
        torch.testing.assert_close(record["masked"][1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_rank_holding_only_padding_sends_every_rank_to_the_gathered_path(records):
    assert all(record["chosen"] is None for record in records["padding"])


def test_plain_greedy_means_nothing_needs_the_whole_row():
    assert is_plain_greedy(SamplingParams(temperature=0.0))
    assert is_plain_greedy(SamplingParams(temperature=0.7, top_k=1))
    assert not is_plain_greedy(SamplingParams(temperature=0.7))
    assert not is_plain_greedy(SamplingParams(temperature=0.0, top_n_tokens=1))
    assert not is_plain_greedy(SamplingParams(temperature=0.0, repetition_penalty=1.2))
    assert not is_plain_greedy(SamplingParams(temperature=0.0, frequency_penalty=0.5))
    assert not is_plain_greedy(SamplingParams(temperature=0.0, presence_penalty=0.5))


def test_one_ranks_greedy_choice_reads_the_statistics_as_combine_greedy_does():
    """On one rank greedy_choice reads each row's token and log-probability off its statistics in Python; the
    C and torch combines give the same ids and the same fp32 log-probabilities, bit for bit."""
    from mixserve.shards import ops
    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.parallel_greedy import combine_stats, greedy_choice, slice_stats

    group = TensorParallelGroup(ParallelConfig())
    torch.manual_seed(0)
    logits = torch.randn(7, 5000) * 6
    packed = slice_stats(logits, 0, 5000)
    ids, logprobs = greedy_choice(packed, group)
    for kernels in ("auto", "torch"):
        ops.select(kernels, torch.device("cpu"), torch.float32)
        expected = combine_stats(packed, group)
        assert ids == expected[0].tolist() and logprobs == expected[1].tolist()
    ops.select("auto", torch.device("cpu"), torch.float32)
    assert ids == logits.argmax(dim=-1).tolist()
    for bad in (float("nan"), float("inf")):
        broken = packed.clone()
        broken[4, 2] = bad
        assert greedy_choice(broken, group) is None
