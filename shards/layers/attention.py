"""Grouped-query attention over the paged KV cache, heads split over ranks.

Decode tokens of all sequences are attended in one batched call over their (padded) block tables;
each prefill chunk is attended on its own with a causal mask offset by its start position.
Legend: T tokens, h query heads and kv KV heads on this rank, d head dim, S block size,
B_d decoding sequences, M blocks per decoding sequence (padded), C context length.
"""

import torch
import torch.nn.functional as F
from torch import nn

from shards.attention_metadata import AttentionMetadata
from shards.checkpoint import CheckpointReader
from shards.config import ModelConfig, ParallelConfig
from shards.distributed import TensorParallelGroup
from shards.kernels import paged_attention as kernel
from shards.layers.linear import QKVParallelLinear, RowParallelLinear
from shards.layers.rotary import RotaryEmbedding


def write_kv(cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v [T, kv, d] into the pools [N, S, kv, d] at the flat slot of each token."""
    k_pool, v_pool = cache
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slots, k)
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slots, v)


def _sliding_window_mask(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None):
    if window is None:
        return mask
    return mask & (k_pos > q_pos - window)


def gathered_decode_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention in torch: one query per sequence, q [B_d, h, d], over its blocks (tables
    [B_d, M], context lengths [B_d]) gathered into one padded tensor; any dtype and device."""
    k_pool, v_pool = cache
    num_kv, head_dim = k_pool.shape[2:]
    nd = q.shape[0]
    keys = k_pool[block_tables].view(nd, -1, num_kv, head_dim).transpose(1, 2)  # [B_d, kv, M S, d]
    values = v_pool[block_tables].view(nd, -1, num_kv, head_dim).transpose(1, 2)
    k_pos = torch.arange(keys.shape[2], device=q.device)  # [M S]
    q_pos = (context_lens - 1).unsqueeze(1)  # [B_d, 1]
    mask = _sliding_window_mask(k_pos < context_lens.unsqueeze(1), q_pos, k_pos, sliding_window)
    return F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B_d, h, 1, d]
        keys,
        values,
        attn_mask=mask[:, None, None, :],  # [B_d, 1, 1, M S]
        scale=scale,
        enable_gqa=True,
    ).squeeze(2)


def paged_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of q [T, h, d] against the cached K/V (already holding this step's tokens).

    Decodes run in the C kernel where it is chosen and fits (fp32 on the CPU; it reads the blocks
    in place), else gathered in torch.
    """
    k_pool, v_pool = cache
    num_kv, head_dim = k_pool.shape[2:]
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        decode = kernel.paged_decode_attention if kernel.usable(q, k_pool) else gathered_decode_attention
        out[:nd] = decode(q[:nd], cache, meta.decode_block_tables, meta.decode_context_lens, scale, sliding_window)
    for chunk in meta.prefills:
        n = chunk.token_end - chunk.token_start
        context = chunk.start_position + n
        keys = k_pool[chunk.block_table].view(-1, num_kv, head_dim)[:context].transpose(0, 1)  # [kv, C, d]
        values = v_pool[chunk.block_table].view(-1, num_kv, head_dim)[:context].transpose(0, 1)
        mask = None
        if chunk.start_position or sliding_window is not None:
            q_pos = torch.arange(chunk.start_position, context, device=q.device).unsqueeze(1)  # [n, 1]
            k_pos = torch.arange(context, device=q.device)  # [C]
            mask = _sliding_window_mask(k_pos <= q_pos, q_pos, k_pos, sliding_window)  # [n, C]
        # 4-D inputs: the CPU flash kernel takes only those (3-D falls back to a far slower path).
        out[chunk.token_start : chunk.token_end] = F.scaled_dot_product_attention(
            q[chunk.token_start : chunk.token_end].transpose(0, 1).unsqueeze(0),  # [1, h, n, d]
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )[0].transpose(0, 1)
    return out


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
        q, k = self.rotary(positions, q, k)
        write_kv(cache, meta.slot_mapping, k, v)
        attn = paged_attention(q, cache, meta, self.scale, self.sliding_window)
        return self.o_proj(attn.reshape(tokens, -1))

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.qkv_proj.load(reader, prefix)
        self.o_proj.load(reader, f"{prefix}.o_proj.weight")
