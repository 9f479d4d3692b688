"""The paged KV cache of one shard: a pool of fixed-size blocks per layer, addressed by the router.

Legend: L layers, N blocks, S block size (token slots per block), kv KV heads on this rank, d head dim.
"""

import torch


class KVCache:
    """Keys and values for every layer, [L, N + r, S, kv, d] each; slot = block * S + offset.

    Blocks 0..N-1 are the router's; the r `reserved_blocks` after them are the shard's own (the
    decode graph runner's scratch block, where padding rows write), never addressable by a step.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        reserved_blocks: int = 0,
    ) -> None:
        shape = (num_layers, num_blocks + reserved_blocks, block_size, num_kv_heads, head_dim)
        # zeros, not empty: a padded decode row reads block 0, and garbage there could be NaN,
        # which survives the -inf mask in the softmax's matmul with V.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s key and value pools, [N, S, kv, d] each (views)."""
        return self.keys[index], self.values[index]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, keys and values."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
