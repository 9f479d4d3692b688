"""A sequence's side of the prefix cache: its chained block hashes, the cached blocks it starts with at
admission, and the blocks a finished step filled, registered once their K/V is complete.

Prefix caching (on by default). Each full block of a sequence's tokens gets a hash chained on the
previous block's; once the step that fills a block is done (not when it is planned: until then its
K/V is not in the cache), the block is registered in the allocator's prefix cache. Admission looks up
the longest run of cached blocks that starts the sequence, shares them (one more reference each) and
starts the sequence past them, always leaving at least its last token to compute, since that token's
logits give the next token. Shared blocks are full and lie before `num_computed`, so no step writes
them; new chunks and decodes go to blocks of the sequence's own. A preempted sequence usually finds
its own blocks again and recomputes little. Cached blocks nobody holds count as free: they are
evicted, least recently freed first, only when no never-cached block is left, and an admission that
revives one pays for it from the free blocks. The scheduler's `prefix_query_tokens` and
`prefix_hit_tokens` count the tokens looked up at admissions and the tokens found. Pure Python: no
torch, no I/O.
"""

from mixserve.router.block_allocator import BlockAllocator
from mixserve.router.prefix_cache import BlockHash, hash_block
from mixserve.router.step_plan import ScheduledSequence, Sequence


def block_hashes(seq: Sequence, block_size: int, num_blocks: int) -> list[BlockHash]:
    """The chained hashes of seq's first `num_blocks` blocks, which must be full."""
    size, hashes = block_size, seq.block_hashes
    while len(hashes) < num_blocks:
        start = len(hashes) * size
        hashes.append(hash_block(hashes[-1] if hashes else seq.hash_root, seq.token_slice(start, start + size)))
    return hashes


def cached_prefix(allocator: BlockAllocator, seq: Sequence) -> list[int]:
    """Cached blocks that start seq, leaving its last token out: its logits give the next token."""
    if allocator.prefix_cache is None or seq.compute_prompt:
        return []
    size = allocator.block_size
    return allocator.match_prefix(block_hashes(seq, size, (seq.num_tokens - 1) // size))


def cache_filled_blocks(allocator: BlockAllocator, entry: ScheduledSequence, computed: int) -> None:
    """Register the blocks the finished step filled with its `computed` leading tokens: their K/V
    is complete now."""
    size, start = allocator.block_size, entry.start_position
    first, end = start // size, (start + computed) // size
    if first == end:
        return
    hashes = block_hashes(entry.seq, size, end)
    table = entry.seq.table
    for index in range(first, end):
        allocator.cache_block(table.blocks[index], hashes[index])
