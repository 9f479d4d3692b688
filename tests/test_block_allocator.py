"""The router's KV block allocator and block tables: free list, errors, slot arithmetic."""

import pytest

from mixserve.router.block_allocator import BlockAllocator, BlockTable, OutOfBlocksError


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 16), (-1, 16), (8, 0), (8, -4)])
def test_allocator_rejects_bad_sizes(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks, block_size)


def test_allocate_hands_out_distinct_blocks_until_exhausted() -> None:
    allocator = BlockAllocator(num_blocks=5, block_size=4)
    assert (allocator.num_free, allocator.num_used) == (5, 0)
    first = allocator.allocate(2)
    second = allocator.allocate(3)
    assert sorted(first + second) == [0, 1, 2, 3, 4]
    assert (allocator.num_free, allocator.num_used) == (0, 5)
    assert allocator.can_allocate(0)
    assert not allocator.can_allocate(1)
    assert allocator.allocate(0) == []


def test_exhaustion_raises_and_takes_nothing() -> None:
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    allocator.allocate(3)
    assert allocator.can_allocate(1)
    assert not allocator.can_allocate(2)
    with pytest.raises(OutOfBlocksError, match="asked for 2"):
        allocator.allocate(2)
    assert allocator.num_free == 1
    with pytest.raises(ValueError):
        allocator.allocate(-1)


def test_freed_blocks_are_reused() -> None:
    allocator = BlockAllocator(num_blocks=3, block_size=2)
    blocks = allocator.allocate(3)
    allocator.free(blocks[:2])
    assert (allocator.num_free, allocator.num_used) == (2, 1)
    assert sorted(allocator.allocate(2)) == sorted(blocks[:2])
    allocator.free(allocator.allocate(0))
    assert allocator.num_used == 3


def test_double_free_is_an_error() -> None:
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    blocks = allocator.allocate(2)
    allocator.free(blocks)
    with pytest.raises(ValueError, match="double free"):
        allocator.free([blocks[0]])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([3])  # never allocated


@pytest.mark.parametrize("block", [-1, 4, 100])
def test_foreign_block_is_an_error(block: int) -> None:
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    allocator.allocate(4)
    with pytest.raises(ValueError, match="not in this cache"):
        allocator.free([block])


def test_bad_free_changes_nothing() -> None:
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    a, b, _, _ = allocator.allocate(4)
    with pytest.raises(ValueError, match="twice in one call"):
        allocator.free([a, b, a])
    with pytest.raises(ValueError):
        allocator.free([a, 99])
    assert allocator.num_used == 4
    allocator.free([a, b])
    assert allocator.num_used == 2


@pytest.mark.parametrize(
    ("num_tokens", "held", "needed"),
    [(0, 0, 0), (1, 0, 1), (4, 0, 1), (5, 0, 2), (8, 2, 0), (9, 2, 1), (16, 2, 2), (3, 2, 0)],
)
def test_blocks_needed(num_tokens: int, held: int, needed: int) -> None:
    table = BlockTable(block_size=4, blocks=list(range(held)))
    assert table.blocks_needed(num_tokens) == needed


def test_grow_covers_positions_and_release_frees_everything() -> None:
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    table = BlockTable(block_size=4)
    table.grow(allocator, 5)
    assert len(table.blocks) == 2 and table.num_slots == 8
    table.grow(allocator, 8)
    assert len(table.blocks) == 2
    table.grow(allocator, 9)
    assert len(table.blocks) == 3 and allocator.num_used == 3
    with pytest.raises(OutOfBlocksError):
        table.grow(allocator, 4 * 9)
    assert len(table.blocks) == 3 and allocator.num_used == 3
    table.release(allocator)
    assert table.blocks == [] and allocator.num_used == 0


def test_slot_mapping_across_block_boundaries() -> None:
    table = BlockTable(block_size=4, blocks=[7, 2, 5])
    # Positions 0-3 live in block 7 (slots 28-31), 4-7 in block 2 (8-11), 8-11 in block 5 (20-23).
    assert table.slot_mapping(0, 12) == [28, 29, 30, 31, 8, 9, 10, 11, 20, 21, 22, 23]
    assert table.slot_mapping(3, 3) == [31, 8, 9]
    assert table.slot_mapping(4, 1) == [8]
    assert table.slot_mapping(11, 1) == [23]
    assert table.slot_mapping(6, 0) == []


def test_slot_mapping_matches_the_formula_everywhere() -> None:
    size, blocks = 3, [4, 0, 9, 1]
    table = BlockTable(block_size=size, blocks=blocks)
    for start in range(table.num_slots + 1):
        for n in range(table.num_slots - start + 1):
            expected = [blocks[p // size] * size + p % size for p in range(start, start + n)]
            assert table.slot_mapping(start, n) == expected


@pytest.mark.parametrize(("start", "n"), [(0, 9), (8, 1), (-1, 2), (2, -1)])
def test_slot_mapping_outside_the_blocks_is_an_error(start: int, n: int) -> None:
    table = BlockTable(block_size=4, blocks=[0, 1])
    with pytest.raises(ValueError, match="outside"):
        table.slot_mapping(start, n)
