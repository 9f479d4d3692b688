"""The torch reference of every op: any dtype, any device, any shape. The other backends' kernels are
tested against these, and fall back to them for shapes past their limits.

Legend: T tokens, H hidden size, h query heads, kv KV heads, d head dim, N blocks, S block size,
B decoding sequences, M block-table width, P prefill chunks, C a chunk's context, E_l experts held,
I_l intermediate size held, K experts per token, R rows, V vocabulary, n ranks, W = ceil(V / 32) 32-bit
words of a grammar's bitmask row.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.shards import ops, parallel_greedy
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.draw import draw_tokens as draw_tokens  # sampled rows' cuts and draw, in torch
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.layers.grouped_experts import run_grouped
from mixserve.shards.quant.int8_weight import Int8Weight, dense


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * x / sqrt(mean(x^2) + eps) of x [T, H], in fp32 as transformers computes it. With
    `residual` [T, H]: (the norm of x + residual, x + residual), the sum being the next residual."""
    if residual is not None:
        summed = x + residual
        return rms_norm(summed, weight, eps), summed
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, h, d] and k [T, kv, d] rotated by their tokens' positions [T] (tables cos, sin [P, d])."""
    cos = cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, d]
    sin = sin[positions].unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def write_kv(
    cache: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store k, v [T, kv, d] into the pools [N, S, kv, d] at the flat slot of each token, rounded to the pools'
    dtype where it differs (a bf16 cache under an fp32 model)."""
    k_pool, v_pool = cache
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slot_mapping, k.to(k_pool.dtype))
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slot_mapping, v.to(v_pool.dtype))


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k, write the rotated k and v into the cache at `slot_mapping`; returns q rotated."""
    q, k = rotary(positions, q, k, cos, sin)
    write_kv(cache, slot_mapping, k, v)
    return q


def _sliding_window_mask(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None):
    if window is None:
        return mask
    return mask & (k_pos > q_pos - window)


def paged_decode_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence, q [B, h, d], over its blocks (tables [B, M], context lengths
    [B], the query's own position included) gathered into one padded tensor; returns [B, h, d]."""
    k_pool, v_pool = cache
    num_kv, head_dim = k_pool.shape[2:]
    nd = q.shape[0]
    # Widened to q's dtype where the cache holds another (a bf16 cache under an fp32 model).
    keys = k_pool[block_tables].view(nd, -1, num_kv, head_dim).transpose(1, 2).to(q.dtype)  # [B, kv, M S, d]
    values = v_pool[block_tables].view(nd, -1, num_kv, head_dim).transpose(1, 2).to(q.dtype)
    k_pos = torch.arange(keys.shape[2], device=q.device)  # [M S]
    q_pos = (context_lens - 1).unsqueeze(1)  # [B, 1]
    mask = _sliding_window_mask(k_pos < context_lens.unsqueeze(1), q_pos, k_pos, sliding_window)
    return F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, h, 1, d]
        keys,
        values,
        attn_mask=mask[:, None, None, :],  # [B, 1, 1, M S]
        scale=scale,
        enable_gqa=True,
    ).squeeze(2)


def prefill_chunks(
    query_start: torch.Tensor, start_positions: torch.Tensor, chunks: list[tuple[int, int]] | None
) -> list[tuple[int, int]]:
    """The prefill chunks as (tokens, start position): `chunks` where the host has them, else read from the
    tensors (query_start [P + 1], start_positions [P])."""
    if chunks is not None:
        return chunks
    return list(zip(query_start.diff().tolist(), start_positions.tolist(), strict=True))


def paged_prefill_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    query_start: torch.Tensor,
    start_positions: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    chunks: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Causal attention of prefill chunks q [T, h, d]: chunk i is q[query_start[i]:query_start[i + 1]]
    (query_start [P + 1]), its first token at start_positions[i] [P], reading its earlier positions
    from the cache through block_tables[i] [P, M]; returns [T, h, d]. The chunks' own K/V are cached.
    `chunks`, the same (tokens, start position) on the host, spares reading the tensors back (and is
    how the meta device, which has no values, runs it)."""
    k_pool, v_pool = cache
    num_kv, head_dim = k_pool.shape[2:]
    out = torch.empty_like(q)
    end = 0
    for chunk, (tokens, start) in enumerate(prefill_chunks(query_start, start_positions, chunks)):
        begin, end = end, end + tokens
        context = start + end - begin
        table = block_tables[chunk]
        keys = k_pool[table].view(-1, num_kv, head_dim)[:context].transpose(0, 1).to(q.dtype)  # [kv, C, d]
        values = v_pool[table].view(-1, num_kv, head_dim)[:context].transpose(0, 1).to(q.dtype)
        mask = None
        if start or sliding_window is not None:
            q_pos = torch.arange(start, context, device=q.device).unsqueeze(1)  # [n, 1]
            k_pos = torch.arange(context, device=q.device)  # [C]
            mask = _sliding_window_mask(k_pos <= q_pos, q_pos, k_pos, sliding_window)  # [n, C]
        # 4-D inputs: the CPU flash kernel takes only those (3-D falls back to a far slower path).
        out[begin:end] = F.scaled_dot_product_attention(
            q[begin:end].transpose(0, 1).unsqueeze(0),  # [1, h, n, d]
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )[0].transpose(0, 1)
    return out


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing of router logits [T, E]: softmax over the experts in fp32, the top K,
    renormalised. Returns weights [T, K] (fp32) and expert ids [T, K] (int64)."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, K]
    return weights / weights.sum(dim=-1, keepdim=True), experts


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor | Int8Weight,
    w2: torch.Tensor | Int8Weight,
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """This rank's partial MoE output [T, H] for hidden [T, H], w13 [E_l, 2 I_l, H], w2 [E_l, H, I_l],
    routing weights [T, K] and expert ids [T, K]: sort by expert, one pair of matmuls per expert that
    received tokens. Ids >= E_l (held by another rank) are skipped. Int8 weights are dequantized to
    hidden's dtype one expert at a time."""
    return grouped_experts(hidden, w13, w2, weights, experts, dense)


def grouped_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor | Int8Weight,
    w2: torch.Tensor | Int8Weight,
    weights: torch.Tensor,
    experts: torch.Tensor,
    densify: Callable[[torch.Tensor | Int8Weight, torch.dtype], torch.Tensor],
) -> torch.Tensor:
    """`fused_moe` with each routed expert's weights made dense by `densify(weight, dtype)`."""

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, densify(w13[expert], rows.dtype)).chunk(2, dim=-1)  # [c, I_l] each
        return F.linear(F.silu(gate) * up, densify(w2[expert], rows.dtype))  # [c, H]

    return run_grouped(hidden, weights, experts, w13.shape[0], expert_mlp)


def linear_rows(x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
    """x [R, K] @ weight [N, K]^T -> [R, N] (the LM head, and int8 projections); an int8 weight is
    dequantized to x's dtype for the call."""
    return F.linear(x, dense(weight, x.dtype))


def decoder_layers(
    layers: nn.ModuleList,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """hidden [T, H] through every decoder layer, each through its modules' forward; a layer's residual
    add is the next one's input norm's (the sum is the same: each layer's output, rounded once)."""
    residual = None
    for index, layer in enumerate(layers):
        hidden, residual = layer.forward_residual(positions, hidden, residual, kv_cache.layer(index), meta)
    return hidden if residual is None else residual + hidden


def causal_lm(
    model: nn.Module,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    logits_indices: torch.Tensor | None,
    gather_logits: bool = True,
    greedy_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """A MixtralForCausalLM's forward through its modules and the other ops: the embedding of token_ids [T],
    every decoder layer, then the final norm and the LM head of the rows at `logits_indices` [R] (None: every
    token), fp32 logits [R, V] (this rank's slice [R, P] without `gather_logits`). With greedy_stats [R, 3]
    float64, also fills it with each row's `slice_greedy_stats` over this rank's real tokens' columns."""
    hidden = model.embed_tokens(token_ids)  # [T, H]
    hidden = ops.current().decoder_layers(model.layers, positions, hidden, kv_cache, meta)
    if logits_indices is not None:
        hidden = hidden[logits_indices]  # [R, H]
    normed, head = model.norm(hidden), model.lm_head
    if greedy_stats is None:
        return head(normed, gather=gather_logits).float()
    local = head(normed, gather=False).float()  # [R, P]
    greedy_stats.copy_(parallel_greedy.slice_stats(local, head.vocab_start, head.vocab_size))
    return head.gather(local) if gather_logits else local


def row_argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [R], logsumexp [R]) of logits [R, V] (the first index of a tied maximum)."""
    return logits.argmax(dim=-1), logits.logsumexp(dim=-1)


def slice_greedy_stats(logits: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """[R, 3] float64 (maximum, its token id, log-sum-exp) of each row of a rank's slice [R, P] whose
    column j is token vocab_start + j; a slice of no columns gives -inf maxima."""
    rows = logits.shape[0]
    if logits.shape[1] == 0:
        best = logsumexp = torch.full((rows,), float("-inf"), device=logits.device)
        index = torch.zeros(rows, dtype=torch.long, device=logits.device)
    else:
        best, index = logits.max(dim=-1)  # the first index of the maximum, as torch.argmax
        logsumexp = logits.logsumexp(dim=-1)
    # float64 holds every token id and fp32 value exactly.
    return torch.stack([best.double(), (index + vocab_start).double(), logsumexp.double()], dim=-1)


def combine_greedy(every: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids [R] int64, log-probabilities [R] fp32) from every rank's slice numbers [R, n, 3], the
    ranks in vocabulary order (a tie goes to the lowest rank); None where any is NaN or infinite."""
    if not torch.isfinite(every).all():
        return None
    maxima, ids, sums = every.unbind(-1)  # [R, n] each
    winner = maxima.argmax(dim=-1, keepdim=True)  # [R, 1]: the first (lowest) rank holding the maximum
    token_ids = ids.gather(1, winner).squeeze(1).long()
    logprobs = (maxima.gather(1, winner).squeeze(1) - sums.logsumexp(dim=-1)).float()
    return token_ids, logprobs


# A token a grammar's mask disallows gets this logit. Finite, so the C argmax / log-sum-exp kernels and
# parallel greedy keep their fast paths (they leave rows holding infinities to the torch path);
# exp(MASKED_LOGIT - any real logit) is exactly 0 in fp32.
MASKED_LOGIT = -1.0e30

# For every byte value, the bias of its 8 tokens: 0 where bit j is set (allowed), MASKED_LOGIT where not. An
# index_select of it and one add mask a row (torch's masked_fill on CPU is ten times slower). [256, 8]
_BYTE_BIAS = torch.where(((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool(), 0.0, MASKED_LOGIT)


@functools.cache
def _byte_bias(device: torch.device) -> torch.Tensor:
    return _BYTE_BIAS.to(device)


def apply_token_bitmask(
    logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, vocab_start: int, vocab_size: int
) -> torch.Tensor:
    """`logits` [R, P] (this rank's columns, column j being token `vocab_start + j`) as a new fp32 tensor
    with the disallowed tokens of the constrained `rows` at MASKED_LOGIT (a finite logit plus it rounds to
    it): a token is allowed where its bit (t % 32 of word t // 32) is set in the row's mask, `bitmask`
    [C, W] int32 holding the rows' masks in order; columns at or past `vocab_size` (padding of the last
    rank's slice) never are."""
    logits = logits.float()
    width = logits.shape[1]
    # Little-endian words (every platform torch runs on): byte k of a row holds tokens 8k .. 8k + 7.
    row_bytes = bitmask.to(logits.device).contiguous().view(torch.uint8).long()  # [C, 4W]
    count = row_bytes.shape[0]
    bias = _byte_bias(logits.device).index_select(0, row_bytes.flatten()).view(count, -1)  # [C, 32W]
    bias = bias[:, vocab_start : min(vocab_start + width, vocab_size)]  # [C, P'] (P' < P: the padding)
    if bias.shape[1] < width:
        bias = torch.cat([bias, bias.new_full((count, width - bias.shape[1]), MASKED_LOGIT)], dim=1)
    if rows == list(range(logits.shape[0])):
        return logits + bias
    return logits.index_add(0, torch.tensor(rows, device=logits.device), bias)
