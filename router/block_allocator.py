"""The router's view of the shards' paged KV cache: which blocks are free, and each sequence's blocks.

The shards hold `num_blocks` blocks of `block_size` token slots each; slot = block * block_size + offset.
The router hands blocks out and tells the shards, per step, which slots to write (slot mapping) and
which blocks to read (block table). With prefix caching, full blocks whose K/V is complete are
shared between sequences (reference-counted) and stay cached after their last holder lets go, until
an allocation needs them. Pure Python: no torch here.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from mixserve.router.prefix_cache import BlockHash, PrefixCache


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockAllocator:
    """KV cache block ids with a reference count each: free, held by one sequence, or shared by several.

    With `enable_prefix_caching`, a block freed while it holds a cached prefix block is parked in the
    prefix cache instead of the free list: it still counts as free, but an allocation takes it only
    when no never-cached block is left, evicting the least recently freed first. A held block (ref
    count > 0) is never evicted or handed out.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + (self.prefix_cache.num_evictable if self.prefix_cache is not None else 0)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable in the prefix cache, held or not."""
        return len(self.prefix_cache) if self.prefix_cache is not None else 0

    def ref_count(self, block: int) -> int:
        """How many sequences hold `block`."""
        return self._ref_counts[block]

    def can_allocate(self, n: int) -> bool:
        """Whether `n` blocks are free now."""
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks, evicting cached ones last; raises OutOfBlocksError (taking none) if too few."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} KV blocks, {self.num_free} of {self.num_blocks} free")
        blocks = []
        for _ in range(n):
            # num_free counted the evictable blocks, so the cache exists whenever the free list runs dry.
            block = self._free.popleft() if self._free else self.prefix_cache.evict()
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each of `blocks`; a block that is not held, or not of this cache, is an error.

        The whole list is checked before anything is freed, so a bad call changes nothing. A block
        whose last reference goes is free again; if it is cached it stays findable until evicted, and
        blocks freed later are evicted later.
        """
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"block freed twice in one call: {blocks}")
        for block in blocks:
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"block {block} is not in this cache of {self.num_blocks} blocks")
            if self._ref_counts[block] == 0:
                raise ValueError(f"block {block} is already free (double free)")
        for block in blocks:
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self.prefix_cache is not None and self.prefix_cache.is_cached(block):
                    self.prefix_cache.park(block)
                else:
                    self._free.append(block)

    def match_prefix(self, hashes: Iterable[BlockHash]) -> list[int]:
        """Cached blocks of the longest leading run of `hashes` (none without prefix caching); takes nothing."""
        return self.prefix_cache.match(hashes) if self.prefix_cache is not None else []

    def share(self, blocks: list[int]) -> None:
        """Take one more reference to each of `blocks`, which must be held or cached (from match_prefix).

        A bad list changes nothing.
        """
        for block in blocks:
            if self._ref_counts[block] == 0 and (self.prefix_cache is None or not self.prefix_cache.is_cached(block)):
                raise ValueError(f"block {block} is free and not cached: allocate it instead")
        for block in blocks:
            if self._ref_counts[block] == 0:
                self.prefix_cache.unpark(block)
            self._ref_counts[block] += 1

    def cache_block(self, block: int, block_hash: BlockHash) -> bool:
        """Make held, full `block`, whose K/V is now complete, findable under `block_hash`.

        False when caching is off or another block already holds that K/V.
        """
        if self._ref_counts[block] == 0:
            raise ValueError(f"block {block} is free: only a held block can be cached")
        return self.prefix_cache is not None and self.prefix_cache.insert(block, block_hash)


@dataclass(slots=True)
class BlockTable:
    """One sequence's blocks in position order: position p lives in blocks[p // block_size]."""

    block_size: int
    blocks: list[int] = field(default_factory=list)

    @property
    def num_slots(self) -> int:
        """Token positions the blocks cover."""
        return len(self.blocks) * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks still to allocate so that positions [0, num_tokens) are covered."""
        return max(0, -(-num_tokens // self.block_size) - len(self.blocks))

    def grow(self, allocator: BlockAllocator, num_tokens: int) -> None:
        """Allocate the blocks that positions [0, num_tokens) still lack."""
        self.blocks.extend(allocator.allocate(self.blocks_needed(num_tokens)))

    def share(self, allocator: BlockAllocator, blocks: list[int]) -> None:
        """Start this empty table with the cached blocks of a prefix, taking a reference to each."""
        if self.blocks:
            raise ValueError("only an empty block table can start from a cached prefix")
        allocator.share(blocks)
        self.blocks.extend(blocks)

    def truncate(self, allocator: BlockAllocator, num_tokens: int) -> None:
        """Give back the tail blocks that hold no position below `num_tokens` (a speculative step's
        rejected positions)."""
        keep = -(-num_tokens // self.block_size)
        if keep < len(self.blocks):
            allocator.free(reversed(self.blocks[keep:]))
            del self.blocks[keep:]

    def release(self, allocator: BlockAllocator) -> None:
        """Give every block back to `allocator` and empty the table."""
        # Last block first: a cached chain is then evicted from its tail, and its head, which more
        # prompts share, lives longest.
        allocator.free(reversed(self.blocks))
        self.blocks.clear()

    def slot_mapping(self, start: int, n: int) -> list[int]:
        """Cache slot of each position in [start, start + n); the blocks must cover them."""
        end = start + n
        if start < 0 or n < 0 or end > self.num_slots:
            raise ValueError(f"positions [{start}, {end}) are outside the table's {self.num_slots} slots")
        slots: list[int] = []
        position = start
        while position < end:
            index, offset = divmod(position, self.block_size)
            take = min(self.block_size - offset, end - position)
            first = self.blocks[index] * self.block_size + offset
            slots.extend(range(first, first + take))
            position += take
        return slots
