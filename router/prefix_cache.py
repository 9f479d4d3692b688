"""Automatic prefix caching: full KV blocks found again by a hash of the tokens that led to them.

A full block's hash chains the hash of the block before it with the block's own tokens, so two
blocks with the same hash hold the same tokens at the same positions after the same prefix, hence
the same K/V. A prompt that starts like an earlier one reuses the earlier one's blocks instead of
recomputing them (vLLM's automatic prefix caching). The table maps hash -> block for blocks whose
K/V is complete; blocks no sequence holds stay in it, evictable least recently freed first, until
the allocator needs them. Pure Python: no torch.
"""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Iterable[int]) -> BlockHash:
    """The chained hash of one full block: the hash of the block before it (None for the first) and its tokens."""
    # SHA-256 rather than Python's hash(): hashes of int tuples can be made to collide on purpose, and
    # a collision would serve one client's prompt from the K/V of another's.
    digest = hashlib.sha256(parent or b"")
    digest.update(array("I", token_ids))
    return digest.digest()


def salted_root(salt: str) -> BlockHash:
    """The parent hash of the first block of a sequence with a cache salt (vLLM's cache_salt): its blocks then
    match only those of sequences with the same salt, so a client cannot tell from a fast first token that
    another's prompt began the same way."""
    return hashlib.sha256(b"cache_salt\0" + salt.encode()).digest()


class PrefixCache:
    """The cached full blocks (hash -> block) and, among them, those no sequence holds, in LRU order.

    The allocator owns reference counts; it tells the cache when a cached block's last holder lets
    go (`park`) and when a parked block is taken again (`unpark`).
    """

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        # Parked blocks, least recently freed first: the eviction order.
        self._parked: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        """Cached blocks no sequence holds: free to hand out, at the price of forgetting them."""
        return len(self._parked)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def match(self, hashes: Iterable[BlockHash]) -> list[int]:
        """Blocks of the longest leading run of `hashes` that is cached, in order."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def insert(self, block: int, block_hash: BlockHash) -> bool:
        """Record that held `block` now holds the complete K/V of `block_hash`.

        False, changing nothing, when another block already holds that K/V (two sequences computed
        the same prefix in the same steps): the first one stays the one to share.
        """
        if block_hash in self._block_of:
            return False
        if block in self._hash_of:
            raise ValueError(f"block {block} is already cached under another hash")
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def park(self, block: int) -> None:
        """The last holder of cached `block` let go: it stays findable and becomes the newest evictable."""
        self._parked[block] = None

    def unpark(self, block: int) -> None:
        """A parked block is held again: it is no longer evictable."""
        del self._parked[block]

    def evict(self) -> int:
        """Forget the least recently freed parked block and return it; KeyError if none is parked."""
        block, _ = self._parked.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block
