"""Interleaved comparisons (benchmarks/interleave.py): the running order of the blocks and how a level's
requests are cut. The run itself against a real server is in test_bench_harness.py."""

import pytest

from mixserve.benchmarks.interleave import block_order, split_blocks


def test_blocks_alternate_and_every_system_finishes_a_block_before_the_next():
    assert block_order(["a", "b"], 4) == [
        (0, "a"),
        (0, "b"),
        (1, "b"),
        (1, "a"),
        (2, "a"),
        (2, "b"),
        (3, "b"),
        (3, "a"),
    ]
    order = block_order(["a", "b", "c"], 3)
    assert [b for b, _ in order] == sorted(b for b, _ in order)
    for name in "abc":  # each system once per block, and its mean position is the same as the others'
        assert [b for b, n in order if n == name] == [0, 1, 2]
    assert block_order(["a"], 2) == [(0, "a"), (1, "a")]
    with pytest.raises(ValueError):
        block_order(["a"], 0)


@pytest.mark.parametrize("count, blocks", [(10, 3), (9, 3), (2, 4), (1, 1), (7, 1), (32, 4)])
def test_a_level_is_cut_into_near_equal_contiguous_blocks(count, blocks):
    items = list(range(count))
    parts = split_blocks(items, blocks)
    assert len(parts) == min(blocks, count)
    assert [x for part in parts for x in part] == items
    assert all(parts) and max(map(len, parts)) - min(map(len, parts)) <= 1
