"""Grouped-query attention over the paged KV cache, heads split over ranks.

Decode tokens of all sequences are attended in one call over their (padded) block tables, the
prefill chunks in another, each chunk causal from its start position (the ops in shards.ops).
Legend: T tokens, h query heads and kv KV heads on this rank, d head dim.
"""

import torch
from torch import nn

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.layers.linear import QKVParallelLinear, RowParallelLinear
from mixserve.shards.layers.rotary import RotaryEmbedding


def paged_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of q [T, h, d] against the cached K/V (already holding this step's tokens): the decode
    tokens (first) through the decode op, the prefill chunks through the prefill op."""
    chosen = ops.current()
    nd = meta.num_decode_tokens
    if not meta.num_prefills:
        return chosen.paged_decode_attention(
            q, cache, meta.decode_block_tables, meta.decode_context_lens, scale, sliding_window
        )
    prefill = chosen.paged_prefill_attention(
        q[nd:],
        cache,
        meta.prefill_query_start,
        meta.prefill_start_positions,
        meta.prefill_block_tables,
        scale,
        sliding_window,
        meta.prefill_chunks,
    )
    if not nd:
        return prefill
    decode = chosen.paged_decode_attention(
        q[:nd], cache, meta.decode_block_tables, meta.decode_context_lens, scale, sliding_window
    )
    return torch.cat([decode, prefill])


class Attention(nn.Module):
    """QKV column-parallel by heads, RoPE, paged attention, o_proj row-parallel (one all-reduce)."""

    def __init__(
        self, config: ModelConfig, parallel: ParallelConfig, group: TensorParallelGroup, rotary: RotaryEmbedding
    ):
        super().__init__()
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads, parallel
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, parallel, group
        )
        self.rotary = rotary

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden)
        q = q.view(tokens, -1, self.head_dim)  # [T, h, d]
        k = k.view(tokens, -1, self.head_dim)  # [T, kv, d]
        v = v.view(tokens, -1, self.head_dim)
        q = ops.current().rotary_write_kv(
            positions, q, k, v, self.rotary.cos, self.rotary.sin, cache, meta.slot_mapping
        )
        attn = paged_attention(q, cache, meta, self.scale, self.sliding_window)
        return self.o_proj(attn.reshape(tokens, -1))

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.qkv_proj.load(reader, prefix)
        self.o_proj.load(reader, f"{prefix}.o_proj.weight")
