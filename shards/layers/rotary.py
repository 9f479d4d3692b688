"""Rotary position embedding (the default RoPE of Llama/Mistral/Mixtral), indexed by position.

Legend: T tokens, h heads, kv KV heads, d head dim, P positions.
"""

import torch
from torch import nn

from mixserve.shards import ops


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, applied per token by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [d/2]
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq  # [P, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, h, d] and k [T, kv, d] by their tokens' positions [T]."""
        return ops.current().rotary(positions, q, k, self.cos, self.sin)
