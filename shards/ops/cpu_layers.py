"""The CPU backend's decoder-layer ops (shards/ops/cpu.py holds the others): causal_lm and
decoder_layers through the decoder layer kernel (shards/kernels/decoder_layer.py), every layer in one
C call where the shard group allows (decoder_stack), and a step past the kernel's measured cap in
consecutive tiles where the warm-up chose them (shards/kernel_tokens.py). What does not fit takes the
torch reference.

Legend: T tokens, H hidden size, R rows asked, P vocabulary rows held.
"""

import torch
from torch import nn

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.kernels import checks, decoder_layer, decoder_stack
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.ops import cpu_rows, reference
from mixserve.shards.shm_collectives import SharedMemoryGroup


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
    """reference.causal_lm in one C call (decoder_stack with the model's ends, stack_ends.c) where the step
    fits the decoder stack, the model's ends fit the call (`kernel_ends`) and linear_rows would run its LM
    head rows in the kernel: the embedding, every layer, the final norm, the LM head and the greedy
    statistics, the same numbers as through the separate ops; else the reference, through the other ops.
    A step past the kernel's cap where the warm-up chose tiles (`_tile`) is one such call per tile, in
    order, each row asked taken from its token's tile. Every torch op this saves would be the first after
    a kernel that streamed the weights through the cache, which makes each ~20-60 us
    (benchmarks/results/decode-step-ends)."""
    ends, halves = model.kernel_ends(), model.layers[0].kernel_halves()
    tokens = token_ids.shape[0]
    rows = tokens if logits_indices is None else logits_indices.shape[0]
    tile = _tile(tokens)
    stack = None
    if (
        ends is not None
        and halves is not None
        and cpu_rows.linear_in_kernel(ends.dtype, min(rows, tile), ends.head)
        and _step_fits(halves, tile, ends.dtype, kv_cache, meta)
    ):
        residual = torch.empty(tile, ends.hidden_size)  # [T, H] fp32, the embedding's rows first
        first = meta if tile == tokens else meta.tokens(0, tile)
        step = decoder_layer.prepare_step(residual, positions[:tile], first, kv_cache.layer(0), *halves)
        stack, shm = _stack(model.layers, kv_cache, step)
    if stack is None:
        return reference.causal_lm(
            model, token_ids, positions, kv_cache, meta, logits_indices, gather_logits, greedy_stats
        )
    logits = torch.empty(rows, ends.vocab_rows)  # [R, P]
    token_ids = checks.index(token_ids, "token_ids", 1)  # int64, contiguous, held while C reads it
    rows_asked = None if logits_indices is None else checks.index(logits_indices, "logits_indices", 1)
    if tile == tokens:
        decoder_stack.run(step, stack, shm, ends.step(token_ids, rows_asked, logits, greedy_stats))
    else:
        for start, end in _spans(tokens, tile):
            if start:
                residual = torch.empty(end - start, ends.hidden_size)
                step = decoder_layer.prepare_step(
                    residual, positions[start:end], meta.tokens(start, end), kv_cache.layer(0), *halves
                )
            # Each row asked goes to the tile holding its token, and comes back to its place in the step's order.
            where = torch.arange(start, end) if rows_asked is None else _rows_within(rows_asked, start, end)
            asked = None if rows_asked is None else rows_asked[where] - start
            out, stats = torch.empty(where.shape[0], ends.vocab_rows), None
            if greedy_stats is not None:
                stats = torch.empty(where.shape[0], 3, dtype=torch.float64)
            decoder_stack.run(step, stack, shm, ends.step(token_ids[start:end], asked, out, stats))
            logits[where] = out
            if stats is not None:
                greedy_stats[where] = stats
    return model.lm_head.gather(logits) if gather_logits else logits


def _tile(tokens: int) -> int:
    """Tokens per decoder layer kernel call for a step of `tokens`: all of them, or the measured cap where
    the step is past it and the warm-up found the kernel clearly ahead of torch's layers at the cap
    (Ops.decoder_layers_tiles). Tiles run in order, each over the K/V the ones before it wrote."""
    current = ops.current()
    cap = current.decoder_layers_max_tokens
    return cap if current.decoder_layers_tiles and tokens > cap else tokens


def _spans(tokens: int, tile: int) -> list[tuple[int, int]]:
    """[start, end) of each tile of `tile` tokens of a step of `tokens`, in order."""
    return [(start, min(start + tile, tokens)) for start in range(0, tokens, tile)]


def _rows_within(rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Indices into rows [R] of the rows whose token is one of [start, end)."""
    return ((rows >= start) & (rows < end)).nonzero().squeeze(1)


def decoder_layers(
    layers: nn.ModuleList,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """reference.decoder_layers through the decoder layer kernel where the step fits it: every layer in
    one C call (decoder_stack, its all-reduces over shared memory in C) where the group allows, else each
    layer as two C calls around its two all-reduces. A step fits where every token is one query over its
    own block table (a decode step, or a small one with prefill chunks), fp32 or bf16, weights not
    quantized by bitsandbytes, shapes within its limits; int8 weights too, in bf16 as well (a 129-token
    prefill of the 0.8B shape's int8 weights in bf16 took 119 ms in it against 129 layer by layer with
    the GEMM path's linears: int8-gemm-crossover-0.8b), and a longer one in tiles where the warm-up chose
    them (`_tile`). The residual stream stays fp32 across the layers (bf16 hidden widened here, rounded
    on return)."""
    halves, tokens = layers[0].kernel_halves(), hidden.shape[0]
    tile = _tile(tokens)
    if halves is None or not hidden.is_cpu or not _step_fits(halves, tile, hidden.dtype, kv_cache, meta):
        return reference.decoder_layers(layers, positions, hidden, kv_cache, meta)
    if tile < tokens:
        spans = _spans(tokens, tile)
        return torch.cat(
            [_layers_in_kernel(layers, positions[s:e], hidden[s:e], kv_cache, meta.tokens(s, e)) for s, e in spans]
        )
    return _layers_in_kernel(layers, positions, hidden, kv_cache, meta)


def _layers_in_kernel(
    layers: nn.ModuleList, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
) -> torch.Tensor:
    """decoder_layers in the kernel, for a step that fits it whole."""
    halves = layers[0].kernel_halves()
    residual = hidden.float().contiguous()  # [T, H] fp32, updated in place
    step = decoder_layer.prepare_step(residual, positions, meta, kv_cache.layer(0), *halves)
    stack, shm = _stack(layers, kv_cache, step)
    if stack is not None:
        decoder_stack.run(step, stack, shm)
        return residual.to(hidden.dtype)
    pending = None
    for index, layer in enumerate(layers):
        pending = decoder_layer_step(layer, step, pending, kv_cache.layer(index))
    residual += pending
    return residual.to(hidden.dtype)


_STACKS = decoder_stack.StackCache()


def _stack(
    layers: nn.ModuleList, kv_cache: KVCache, step: decoder_layer.KernelStep
) -> tuple[decoder_stack.Stack | None, SharedMemoryGroup | None]:
    """The layers as one decoder_stack call, and the shared-memory group it all-reduces over (None on one
    rank); no stack where an all-reduce would leave the shared memory (torch's collectives, a step too
    big for its slots) or the layers differ in what the call takes once. Every layer of a model is built
    with the model's one group (MixtralModel), so layer 0's attention says which."""
    group = layers[0].self_attn.o_proj.group
    shm = None
    if group.world_size > 1:
        shm = group.shm
        if shm is None or not shm.fits(step.attn_out):
            return None, None
    halves = [layer.kernel_halves() for layer in layers]
    if any(h is None for h in halves):
        return None, None
    return _STACKS.get(layers, kv_cache, halves), shm


def decoder_layer_step(
    layer: nn.Module,
    step: decoder_layer.KernelStep,
    pending: torch.Tensor | None,
    cache: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One DecoderLayer's forward through the kernel: adds `pending` (the previous layer's summed MoE
    output, None for the first layer) to step.hidden [T, H] in place and returns this layer's summed
    MoE output, which the caller adds after the last layer."""
    attention, experts = layer.kernel_halves()
    decoder_layer.attention_block(step, pending, attention, cache)
    attn_sum = layer.self_attn.o_proj.group.all_reduce(step.attn_out)
    decoder_layer.moe_block(step, attn_sum, experts)
    return layer.block_sparse_moe.group.all_reduce(step.moe_out)


def _step_fits(halves: tuple, tokens: int, dtype: torch.dtype, kv_cache: KVCache, meta: AttentionMetadata) -> bool:
    attention, experts = halves
    _, heads, _, head_dim = attention.shape_key
    return (
        meta.per_token() is not None
        and dtype in cpu_rows.WEIGHT_DTYPES
        and kv_cache.keys.dtype in cpu_rows.WEIGHT_DTYPES
        and decoder_layer.fits(tokens, heads, head_dim, kv_cache.block_size, experts.shape_key[0])
    )
