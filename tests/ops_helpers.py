"""What the ops tests share: random paged K/V pools."""

import torch


def paged_pools(blocks=6, block_size=4, kv_heads=2, head_dim=8):
    gen = torch.Generator().manual_seed(0)
    shape = (blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
