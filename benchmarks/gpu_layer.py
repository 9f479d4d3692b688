"""One Mixtral decoder layer of one tensor-parallel rank, two ways: today's torch path and the Triton kernels.

`bench gpu` times these steps; they hold no serving code. Both take the same weights, KV pools
and step inputs and return the layer's output hidden states:
- torch: the paths a CUDA shard took before the Triton kernels (RMSNorm and RoPE as RMSNorm and
  RotaryEmbedding compute them off the CPU, `write_kv`, `paged_decode_attention` or
  `paged_prefill_attention`, `topk_softmax`, `fused_moe` of shards/ops/reference.py);
- triton: fused RMSNorm (+ residual), rotary + KV write, paged attention read in place, routing in one
  kernel, fused MoE.
Neither runs the all-reduces of a real rank (one GPU stands in for one rank of four).

Legend: T tokens, H hidden size, h query heads and kv KV heads on this rank, d head dim, E experts,
I intermediate size per rank, N blocks, S block size, B decoding sequences, M blocks per table,
P prefill chunks.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixserve.shards.layers.rotary import RotaryEmbedding
from mixserve.shards.ops import reference
from mixserve.shards.triton.attention import paged_decode_attention, paged_prefill_attention
from mixserve.shards.triton.moe import fused_moe
from mixserve.shards.triton.norm import rms_norm
from mixserve.shards.triton.rotary import rotary_write_kv
from mixserve.shards.triton.routing import topk_softmax


@dataclass(frozen=True, slots=True)
class RankShapes:
    """The shapes of one rank's slice of the model."""

    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    inter: int
    block_size: int
    vocab: int  # the LM head's rows on this rank
    layers: int
    eps: float = 1e-5
    rope_theta: float = 1e6


# Mixtral-8x7B split over four ranks: 32/4 query heads, 8/4 KV heads, 14336/4 intermediate, 32000/4 vocab.
MIXTRAL_8X7B_RANK = RankShapes(4096, 8, 2, 128, 8, 2, 3584, 16, 8000, 32)
# The dry run's shapes: every dimension small, head dim and group sizes the kernels accept.
TINY_RANK = RankShapes(64, 4, 2, 16, 4, 2, 32, 4, 64, 2)


@dataclass(slots=True)
class LayerWeights:
    """One decoder layer's weights on one rank, random (std 0.02, norms near 1)."""

    input_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(h + 2 kv) d, H]
    o_proj: torch.Tensor  # [H, h d]
    post_norm: torch.Tensor  # [H]
    gate: torch.Tensor  # [E, H]
    w13: torch.Tensor  # [E, 2 I, H]
    w2: torch.Tensor  # [E, H, I]
    cos: torch.Tensor  # [positions, d] fp32
    sin: torch.Tensor  # [positions, d] fp32

    @classmethod
    def random(cls, shapes: RankShapes, max_positions: int, dtype: torch.dtype, device: torch.device) -> "LayerWeights":
        """Weights drawn on the device; the model's rotary tables (RotaryEmbedding's)."""
        hidden, d = shapes.hidden, shapes.head_dim

        def normal(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, device=device) * 0.02).to(dtype)

        def norm_weight() -> torch.Tensor:
            return (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)

        rotary = RotaryEmbedding(d, max_positions, shapes.rope_theta).to(device)
        return cls(
            input_norm=norm_weight(),
            qkv=normal((shapes.q_heads + 2 * shapes.kv_heads) * d, hidden),
            o_proj=normal(hidden, shapes.q_heads * d),
            post_norm=norm_weight(),
            gate=normal(shapes.experts, hidden),
            w13=normal(shapes.experts, 2 * shapes.inter, hidden),
            w2=normal(shapes.experts, hidden, shapes.inter),
            cos=rotary.cos,
            sin=rotary.sin,
        )


@dataclass(slots=True)
class DecodeBatch:
    """One decode step's inputs: one token per sequence at the end of its context."""

    hidden: torch.Tensor  # [B, H]
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, M] int32
    context_lens: torch.Tensor  # [B] int32, the new token included


@dataclass(slots=True)
class PrefillBatch:
    """One step of P prompt chunks back to back; each chunk's earlier positions are already cached."""

    hidden: torch.Tensor  # [T, H]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T]
    query_start: torch.Tensor  # [P + 1] int32
    start_positions: torch.Tensor  # [P] int32
    block_tables: torch.Tensor  # [P, M] int32
    chunks: list[tuple[int, int]]  # (start position, length) of each chunk


def random_pools(shapes: RankShapes, blocks: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """K and V pools [N, S, kv, d] of random values (never zeros: they hide unread blocks)."""
    shape = (blocks, shapes.block_size, shapes.kv_heads, shapes.head_dim)
    return tuple(torch.randn(shape, device=device).to(dtype) for _ in range(2))


def _tables(sequences: int, tokens: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Block tables [sequences, M] covering `tokens` each, the blocks shuffled over the pool."""
    per_sequence = -(-tokens // block_size)
    order = torch.randperm(sequences * per_sequence, device=device)
    return order.view(sequences, per_sequence).to(torch.int32)


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    rows = torch.arange(tables.shape[0], device=tables.device)
    return tables[rows, positions // block_size].long() * block_size + positions % block_size


def decode_batch(shapes: RankShapes, batch: int, context: int, dtype: torch.dtype, device: torch.device) -> DecodeBatch:
    """B sequences of `context` tokens each (the new token last), over distinct shuffled blocks."""
    tables = _tables(batch, context, shapes.block_size, device)  # [B, M]
    positions = torch.full((batch,), context - 1, device=device)
    return DecodeBatch(
        hidden=torch.randn(batch, shapes.hidden, device=device).to(dtype),
        positions=positions,
        slots=_slots(tables, positions, shapes.block_size),
        block_tables=tables,
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
    )


def prefill_batch(
    shapes: RankShapes, chunks: list[tuple[int, int]], dtype: torch.dtype, device: torch.device
) -> PrefillBatch:
    """Chunks (start position, length), each its own sequence over distinct shuffled blocks."""
    longest = max(start + length for start, length in chunks)
    tables = _tables(len(chunks), longest, shapes.block_size, device)  # [P, M]
    positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in chunks])  # [T]
    owner = torch.cat([torch.full((n,), p, device=device) for p, (_, n) in enumerate(chunks)])  # [T]
    slots = tables[owner, positions // shapes.block_size].long() * shapes.block_size + positions % shapes.block_size
    bounds = [0]
    for _, n in chunks:
        bounds.append(bounds[-1] + n)
    return PrefillBatch(
        hidden=torch.randn(bounds[-1], shapes.hidden, device=device).to(dtype),
        positions=positions,
        slots=slots,
        query_start=torch.tensor(bounds, dtype=torch.int32, device=device),
        start_positions=torch.tensor([s for s, _ in chunks], dtype=torch.int32, device=device),
        block_tables=tables,
        chunks=chunks,
    )


def _split_heads(shapes: RankShapes, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, h, d], k and v [T, kv, d]: views of the fused projection qkv [T, (h + 2 kv) d]."""
    d = shapes.head_dim
    sizes = [shapes.q_heads * d, shapes.kv_heads * d, shapes.kv_heads * d]
    q, k, v = (t.view(qkv.shape[0], -1, d) for t in qkv.split(sizes, dim=-1))
    return q, k, v


def torch_layer(
    shapes: RankShapes,
    weights: LayerWeights,
    cache: tuple[torch.Tensor, torch.Tensor],
    step: DecodeBatch | PrefillBatch,
) -> torch.Tensor:
    """Today's torch path: the decoder layer's output [T, H] (MixtralDecoderLayer.forward)."""
    hidden = step.hidden
    tokens, d = hidden.shape[0], shapes.head_dim
    q, k, v = _split_heads(shapes, F.linear(reference.rms_norm(hidden, weights.input_norm, shapes.eps), weights.qkv))
    q = reference.rotary_write_kv(step.positions, q, k, v, weights.cos, weights.sin, cache, step.slots)
    scale = d**-0.5
    if isinstance(step, DecodeBatch):
        attn = reference.paged_decode_attention(q, cache, step.block_tables.long(), step.context_lens.long(), scale)
    else:
        attn = reference.paged_prefill_attention(
            q, cache, step.query_start, step.start_positions, step.block_tables, scale
        )
    hidden = hidden + F.linear(attn.reshape(tokens, -1), weights.o_proj)
    normed = reference.rms_norm(hidden, weights.post_norm, shapes.eps)
    routing, experts = reference.topk_softmax(F.linear(normed, weights.gate), shapes.top_k)
    return hidden + reference.fused_moe(normed, weights.w13, weights.w2, routing, experts)


def triton_layer(
    shapes: RankShapes,
    weights: LayerWeights,
    cache: tuple[torch.Tensor, torch.Tensor],
    step: DecodeBatch | PrefillBatch,
) -> torch.Tensor:
    """The Triton path: the same output [T, H] with no host sync (decode steps capture in a CUDA graph)."""
    hidden = step.hidden
    tokens, d = hidden.shape[0], shapes.head_dim
    q, k, v = _split_heads(shapes, F.linear(rms_norm(hidden, weights.input_norm, shapes.eps), weights.qkv))
    rotary_write_kv(step.positions, q, k, v, weights.cos, weights.sin, cache[0], cache[1], step.slots)
    scale = d**-0.5
    if isinstance(step, DecodeBatch):
        attn = paged_decode_attention(q, cache, step.block_tables, step.context_lens, scale)
    else:
        longest = max(n for _, n in step.chunks)
        attn = paged_prefill_attention(
            q, cache, step.query_start, step.start_positions, step.block_tables, scale, max_chunk_len=longest
        )
    normed, hidden = rms_norm(
        F.linear(attn.reshape(tokens, -1), weights.o_proj), weights.post_norm, shapes.eps, residual=hidden
    )
    routing, experts = topk_softmax(F.linear(normed, weights.gate), shapes.top_k)
    return hidden + fused_moe(normed, weights.w13, weights.w2, routing, experts)


def expected_experts_hit(shapes: RankShapes, tokens: int) -> float:
    """Distinct experts T tokens select when each picks top_k of E uniformly: E (1 - (1 - K/E)^T)."""
    return shapes.experts * (1 - (1 - shapes.top_k / shapes.experts) ** tokens)
