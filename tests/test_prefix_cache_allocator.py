"""Prefix caching in the block allocator: block hashes chained on their parent, the longest cached
leading run matched, shared blocks reference-counted, freed cached blocks parked (findable, counted
as free) and evicted least recently freed, held blocks never."""

import pytest

from mixserve.router.block_allocator import BlockAllocator, BlockTable, OutOfBlocksError
from mixserve.router.prefix_cache import hash_block


def test_block_hash_chains_on_the_parent_and_the_tokens_in_order():
    first = hash_block(None, [1, 2, 3])
    assert first == hash_block(None, [1, 2, 3]) and len(first) == 32
    assert first != hash_block(None, [3, 2, 1])
    # The same tokens after a different prefix are a different block.
    assert hash_block(first, [4, 5, 6]) != hash_block(hash_block(None, [9, 9, 9]), [4, 5, 6])
    assert hash_block(first, [4, 5, 6]) != hash_block(None, [4, 5, 6])


def cached_allocator(num_blocks: int, held: int) -> tuple[BlockAllocator, list[int], list[bytes]]:
    """An allocator with `held` blocks allocated and cached as one chain."""
    allocator = BlockAllocator(num_blocks, block_size=2, enable_prefix_caching=True)
    blocks = allocator.allocate(held)
    hashes: list[bytes] = []
    for i, block in enumerate(blocks):
        hashes.append(hash_block(hashes[-1] if hashes else None, [i, i]))
        assert allocator.cache_block(block, hashes[-1])
    return allocator, blocks, hashes


def test_match_takes_the_longest_cached_leading_run():
    allocator, blocks, hashes = cached_allocator(8, 3)
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.match_prefix(hashes + [hash_block(hashes[-1], [7, 7])]) == blocks
    assert allocator.match_prefix([hash_block(None, [5, 5]), *hashes]) == []
    allocator.free([blocks[1]])
    allocator.allocate(6)  # the 5 never-cached blocks, then blocks[1], evicted
    assert allocator.match_prefix(hashes) == [blocks[0]]
    assert allocator.num_cached == 2


def test_freed_cached_blocks_stay_findable_and_count_as_free():
    allocator, blocks, hashes = cached_allocator(4, 3)
    assert (allocator.num_used, allocator.num_free, allocator.num_cached) == (3, 1, 3)
    allocator.free(blocks)
    assert (allocator.num_used, allocator.num_free, allocator.num_cached) == (0, 4, 3)
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.can_allocate(4) and not allocator.can_allocate(5)


def test_allocation_takes_never_cached_blocks_first_then_evicts_least_recently_freed():
    allocator, blocks, hashes = cached_allocator(5, 3)
    allocator.free([blocks[1]])
    allocator.free([blocks[0]])
    allocator.free([blocks[2]])
    never_cached = allocator.allocate(2)
    assert sorted(never_cached) == [3, 4] and allocator.num_cached == 3
    assert allocator.allocate(1) == [blocks[1]]
    assert allocator.match_prefix(hashes) == [blocks[0]]  # the chain breaks at the evicted block
    assert allocator.allocate(2) == [blocks[0], blocks[2]]
    assert allocator.num_cached == 0 and allocator.num_free == 0
    # An evicted block comes back uncached: freed, it goes to the plain free list.
    allocator.free([blocks[0]])
    assert allocator.match_prefix(hashes) == [] and allocator.allocate(1) == [blocks[0]]


def test_held_blocks_are_never_evicted():
    allocator, blocks, hashes = cached_allocator(3, 3)
    allocator.free([blocks[2]])
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(2)
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.allocate(1) == [blocks[2]]
    assert allocator.match_prefix(hashes) == blocks[:2]
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(1)


def test_shared_blocks_are_reference_counted():
    allocator, blocks, hashes = cached_allocator(4, 2)
    allocator.share(blocks)  # a second sequence takes the held chain
    assert [allocator.ref_count(b) for b in blocks] == [2, 2] and allocator.num_used == 2
    allocator.free(blocks)
    assert [allocator.ref_count(b) for b in blocks] == [1, 1] and allocator.num_free == 2
    allocator.free(blocks)
    assert allocator.num_free == 4 and allocator.match_prefix(hashes) == blocks
    # Taking a parked block revives it: it is held again and no longer free.
    allocator.share(blocks[:1])
    assert allocator.ref_count(blocks[0]) == 1 and allocator.num_free == 3
    assert allocator.allocate(3) == [2, 3, blocks[1]]  # blocks[0] is held: never evicted
    assert allocator.match_prefix(hashes) == blocks[:1]


def test_share_and_cache_refuse_free_blocks():
    allocator = BlockAllocator(4, block_size=2, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="not cached"):
        allocator.share([1])
    # A bad list takes nothing, not even the cached blocks before the bad one.
    held, hashes = allocator.allocate(1), [hash_block(None, [0, 0])]
    allocator.cache_block(held[0], hashes[0])
    allocator.free(held)
    with pytest.raises(ValueError, match="not cached"):
        allocator.share([held[0], 1])
    assert allocator.ref_count(held[0]) == 0 and allocator.num_free == 4
    allocator.share(held)
    assert allocator.ref_count(held[0]) == 1 and allocator.num_free == 3
    with pytest.raises(ValueError, match="only a held block"):
        allocator.cache_block(1, hash_block(None, [1, 1]))
    table = BlockTable(block_size=2, blocks=list(held))
    with pytest.raises(ValueError, match="empty block table"):
        table.share(allocator, held)


def test_second_block_with_the_same_contents_is_not_cached():
    allocator, blocks, hashes = cached_allocator(4, 1)
    (twin,) = allocator.allocate(1)
    assert not allocator.cache_block(twin, hashes[0])
    allocator.free([twin, blocks[0]])
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.allocate(3) == [2, 3, twin]  # the twin went to the plain free list


def test_release_evicts_a_chain_from_its_tail():
    allocator, blocks, hashes = cached_allocator(3, 3)
    BlockTable(block_size=2, blocks=list(blocks)).release(allocator)
    assert allocator.allocate(1) == [blocks[2]]
    assert allocator.match_prefix(hashes) == blocks[:2]
    assert allocator.allocate(2) == [blocks[1], blocks[0]]


def test_without_prefix_caching_nothing_is_cached():
    allocator = BlockAllocator(4, block_size=2)
    (block,) = allocator.allocate(1)
    assert not allocator.cache_block(block, hash_block(None, [1, 1]))
    assert allocator.match_prefix([hash_block(None, [1, 1])]) == [] and allocator.num_cached == 0
