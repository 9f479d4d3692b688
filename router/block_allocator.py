"""The router's view of the shards' paged KV cache: which blocks are free, and each sequence's blocks.

The shards hold `num_blocks` blocks of `block_size` token slots each; slot = block * block_size + offset.
The router hands blocks out and tells the shards, per step, which slots to write (slot mapping) and
which blocks to read (block table). Pure Python: no torch here.
"""

from collections import deque
from dataclasses import dataclass, field


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockAllocator:
    """A free list of KV cache block ids with a reference count per block.

    Every block is held by at most one sequence today; the counts are there so a prefix cache can
    later share a block between sequences without changing how blocks are freed.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        """Whether `n` blocks are free now."""
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks; raises OutOfBlocksError (taking none) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give `blocks` back; a block that is not in use, or not of this cache, is an error.

        The whole list is checked before anything is freed, so a bad call changes nothing.
        """
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
                # Freed blocks go to the back: the least recently freed is reused first, which a
                # prefix cache will want (recently freed blocks are the likeliest to be hit again).
                self._free.append(block)


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

    def release(self, allocator: BlockAllocator) -> None:
        """Give every block back to `allocator` and empty the table."""
        allocator.free(self.blocks)
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
