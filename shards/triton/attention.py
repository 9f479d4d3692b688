"""Paged attention in Triton: decode (flash-decoding over the GQA group) and chunked prefill.

Wrappers (the kernels are in attention_kernels.py):

    paged_decode_attention(q, cache, block_tables, context_lens, scale, sliding_window=None,
                           partition_size=None) -> out
        q [B, h, d]; cache = (k_pool, v_pool), each [N, S, kv, d]; block_tables [B, M] int32/int64
        (padded with block 0); context_lens [B] int32/int64 counting the query's own position;
        returns [B, h, d] in q's dtype. A context of 0 (a padded row) gives zeros.
        Grid (B, kv, splits), splits = ceil(M * S / partition_size); then a reduction over the
        splits with grid (B, h) when splits > 1. partition_size (a power of two >= DECODE_BLOCK_N)
        is chosen from B, kv, M * S and the GPU's SM count alone, so a call is capturable in a
        CUDA graph: on CUDA, partitions small enough that B * kv * splits fills the SMs twice over
        (no smaller than MIN_PARTITION); on the CPU (the interpreter) one partition.

    paged_prefill_attention(q, cache, query_start, start_positions, block_tables, scale,
                            sliding_window=None, max_chunk_len=None) -> out
        q [T, h, d], P chunks back to back; query_start [P + 1] cumulative offsets into q (0 to T);
        start_positions [P] the position of each chunk's first token (earlier positions, and the
        chunk's own K/V, are in the cache); block_tables [P, M]; returns [T, h, d] in q's dtype.
        Causal from the start position, GQA, sliding window. Grid (P, ceil(max_chunk_len / BLOCK_Q),
        kv) with BLOCK_Q = PREFILL_BLOCK_M / G_PAD tokens a tile; max_chunk_len is a host int the
        caller knows (the longest chunk; default T, always enough): a longer chunk's tail is not computed.

    usable(q, k_pool, interpreter=False) -> bool: whether these kernels take q over k_pool (triton
        installed; fp16/bf16/fp32 alike in q and the pools; head dim a power of two in [16, 128];
        heads a multiple of KV heads; CUDA tensors with the kernels compiled, or CPU tensors when the
        caller asks for the interpreter and triton runs interpreted).

    Both wrappers raise ValueError on arguments they do not take (shapes, dtypes, devices), read the
    pools in place, accumulate in fp32, and launch on the current CUDA device (which must be q's).
    Block ids, context lengths, offsets and positions must lie inside the pools and tables: checking
    them would cost a host sync (the runner builds them so).

Legend: B decoding sequences, P prefill chunks, T query tokens, h query heads, kv KV heads,
G = h / kv, G_PAD the group padded to a power of two, d head dim, N blocks, S block size, M table width.
"""

import functools

import torch

try:
    from triton.runtime.interpreter import InterpretedFunction

    from mixserve.shards.triton import attention_kernels as kernels
except ImportError:  # triton is not installed: usable() says no and the torch paths serve
    kernels = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # fp32 prefill tiles of 256 would overflow shared memory
# Tile sizes, checked by compiling for sm80/sm90 (ptxas): no register spills in fp16/bf16 at head dim 128.
DECODE_BLOCK_N = 32  # key positions a decode program reads per step (4 warps, ~72-84 registers)
PREFILL_BLOCK_M = 64  # (token, head) rows of a prefill tile
PREFILL_BLOCK_N = 64  # key positions per step for fp16/bf16 (8 warps, ~140-180 registers)
PREFILL_BLOCK_N_FP32 = 32  # fp32 tiles are twice the bytes: 64 would spill
PREFILL_WARPS = 8
# The shortest decode partition (4 K/V tiles): each partition also loads q and writes a partial for
# the reduction, a fixed cost that short ones do not repay. A floor not yet tuned on a GPU.
MIN_PARTITION = 128
# tl.dot needs at least 16 rows on the tensor cores: a decode tile's group is padded to it.
MIN_DOT_ROWS = 16


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 was set when triton was
    imported): then they take CPU tensors, at ~20-30 ms a program."""
    return kernels is not None and isinstance(kernels.decode_partition_kernel, InterpretedFunction)


def usable(q: torch.Tensor, k_pool: torch.Tensor, interpreter: bool = False) -> bool:
    """Whether the Triton kernels take attention of `q` [.., h, d] over `k_pool` [N, S, kv, d].

    CPU tensors qualify only with `interpreter` (the caller asks for the interpreter, a test mode far
    slower than the torch path) and the kernels interpreted; CUDA tensors only with them compiled.
    """
    if kernels is None or q.dtype not in DTYPES or k_pool.dtype != q.dtype or q.device != k_pool.device:
        return False
    head_dim, heads, kv_heads = q.shape[-1], q.shape[-2], k_pool.shape[2]
    if head_dim != k_pool.shape[3] or not _power_of_two(head_dim) or not 16 <= head_dim <= MAX_HEAD_DIM:
        return False
    if heads % kv_heads:
        return False
    if q.device.type == "cpu":
        return interpreter and interpreted()
    return q.device.type == "cuda" and not interpreted()


def paged_decode_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    partition_size: int | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, h, d] over the paged cache, read in place; returns [B, h, d]."""
    k_pool, v_pool = cache
    _check_common(q, k_pool, v_pool, block_tables, sliding_window)
    batch, heads, head_dim = q.shape
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(
            f"decode attention: {batch} queries but block tables {tuple(block_tables.shape)} "
            f"and context lengths {tuple(context_lens.shape)}"
        )
    _check_index(context_lens, q.device, "context_lens")
    kv_heads, block_size = k_pool.shape[2], k_pool.shape[1]
    group = heads // kv_heads
    max_tokens = block_tables.shape[1] * block_size
    if partition_size is None:
        sm_count = _sm_count(q.device.index) if q.device.type == "cuda" else None
        partition_size = decode_partition_size(batch, kv_heads, max_tokens, sm_count)
    elif not _power_of_two(partition_size) or partition_size < DECODE_BLOCK_N:
        raise ValueError(f"partition_size must be a power of two >= {DECODE_BLOCK_N}, got {partition_size}")
    splits = decode_splits(max_tokens, partition_size)

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    if splits == 1:
        partial_out = out
        maxes = sums = out  # not read: the single partition normalises in place
    else:
        partial_out = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        maxes = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        sums = torch.empty_like(maxes)
    kernels.decode_partition_kernel[(batch, kv_heads, splits)](
        q,
        k_pool,
        v_pool,
        block_tables,
        context_lens,
        partial_out,
        maxes,
        sums,
        scale,
        sliding_window or 0,
        partition_size,
        splits,
        q.stride(0),
        q.stride(1),
        *k_pool.stride()[:3],
        *v_pool.stride()[:3],
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(MIN_DOT_ROWS, _next_power_of_two(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=DECODE_BLOCK_N,
        HAS_WINDOW=sliding_window is not None,
        DIRECT=splits == 1,
        DOT_FP32=_dot_in_fp32(q),
    )
    if splits > 1:
        kernels.decode_reduce_kernel[(batch, heads)](
            partial_out, maxes, sums, out, splits, HEAD_DIM=head_dim, SPLITS_PAD=_next_power_of_two(splits)
        )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    query_start: torch.Tensor,
    start_positions: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_chunk_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of P prefill chunks, q [T, h, d] back to back, over the paged cache (which
    holds every chunk's earlier positions and its own K/V); returns [T, h, d]."""
    k_pool, v_pool = cache
    _check_common(q, k_pool, v_pool, block_tables, sliding_window)
    tokens, heads, head_dim = q.shape
    chunks = block_tables.shape[0]
    if query_start.shape != (chunks + 1,) or start_positions.shape != (chunks,):
        raise ValueError(
            f"prefill attention: block tables for {chunks} chunks but query_start "
            f"{tuple(query_start.shape)} and start_positions {tuple(start_positions.shape)}"
        )
    _check_index(query_start, q.device, "query_start")
    _check_index(start_positions, q.device, "start_positions")
    if max_chunk_len is None:
        max_chunk_len = tokens
    elif not 0 <= max_chunk_len <= tokens:
        raise ValueError(f"max_chunk_len {max_chunk_len} outside [0, {tokens}]")
    kv_heads, block_size = k_pool.shape[2], k_pool.shape[1]
    group = heads // kv_heads
    group_pad = _next_power_of_two(group)
    block_q = max(1, PREFILL_BLOCK_M // group_pad)

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if tokens == 0 or chunks == 0:
        return out
    grid = (chunks, max(1, -(-max_chunk_len // block_q)), kv_heads)
    kernels.prefill_kernel[grid](
        q,
        k_pool,
        v_pool,
        block_tables,
        query_start,
        start_positions,
        out,
        scale,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        *k_pool.stride()[:3],
        *v_pool.stride()[:3],
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=PREFILL_BLOCK_N_FP32 if q.dtype == torch.float32 else PREFILL_BLOCK_N,
        HAS_WINDOW=sliding_window is not None,
        DOT_FP32=_dot_in_fp32(q),
        num_warps=PREFILL_WARPS,
    )
    return out


def _check_common(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    sliding_window: int | None,
) -> None:
    if kernels is None:
        raise ValueError("the Triton attention kernels need triton installed")
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"attention wants q [T, h, d] and pools [N, S, kv, d], got q {tuple(q.shape)}, "
            f"k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}"
        )
    if q.dtype not in DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"attention dtypes: q {q.dtype}, k {k_pool.dtype}, v {v_pool.dtype} (one of {DTYPES})")
    if not (q.device == k_pool.device == v_pool.device == block_tables.device):
        raise ValueError(
            f"attention devices: q {q.device}, k {k_pool.device}, v {v_pool.device}, tables {block_tables.device}"
        )
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        raise ValueError(f"attention on {q.device} but the current CUDA device is {torch.cuda.current_device()}")
    if q.device.type == "cpu" and not interpreted():
        raise ValueError("attention on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"attention on {q.device}: Triton runs on CUDA (or the CPU through its interpreter)")
    heads, head_dim = q.shape[1:]
    kv_heads = k_pool.shape[2]
    if head_dim != k_pool.shape[3] or heads % kv_heads:
        raise ValueError(f"attention: q has {heads} heads of {head_dim}, the pools {kv_heads} of {k_pool.shape[3]}")
    if not _power_of_two(head_dim) or not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {head_dim} is not a power of two in [16, {MAX_HEAD_DIM}]")
    if q.stride(2) != 1 or k_pool.stride(3) != 1 or v_pool.stride(3) != 1:
        raise ValueError("attention: q and the pools must be contiguous along the head dim")
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64) or block_tables.stride(1) != 1:
        raise ValueError(
            f"attention: block tables must be 2-D int32/int64, rows contiguous; got {block_tables.dtype} "
            f"{tuple(block_tables.shape)} strides {block_tables.stride()}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")


def _check_index(t: torch.Tensor, device: torch.device, name: str) -> None:
    if t.dtype not in (torch.int32, torch.int64) or t.device != device or not t.is_contiguous():
        raise ValueError(f"attention: {name} must be contiguous int32/int64 on {device}, got {t.dtype} on {t.device}")


def decode_partition_size(batch: int, kv_heads: int, max_tokens: int, sm_count: int | None) -> int:
    """Tokens per decode partition, from shapes alone (the same shapes always give the same grid): on
    a GPU of `sm_count` SMs, partitions small enough for B kv splits to fill the SMs twice over; on
    the CPU (None: the interpreter) one partition."""
    if sm_count is None:
        return max(DECODE_BLOCK_N, _next_power_of_two(max_tokens))
    splits_wanted = -(-2 * sm_count // (batch * kv_heads))
    tokens_per_split = max(1, -(-max_tokens // splits_wanted))
    # Rounded down to a power of two: at least the splits wanted.
    return max(MIN_PARTITION, 1 << tokens_per_split.bit_length() - 1)


def decode_splits(max_tokens: int, partition_size: int) -> int:
    """Partitions of a decode row of `max_tokens` key positions (the table width times the block size)."""
    return max(1, -(-max_tokens // partition_size))


def decode_workspace_bytes(batch: int, heads: int, head_dim: int, splits: int, dtype: torch.dtype) -> int:
    """Bytes `paged_decode_attention` allocates: its output [B, h, d] in q's dtype and, with more than
    one split, the partial outputs [B, h, splits, d] and their maxima and sums [B, h, splits] in fp32."""
    out = batch * heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    partials = batch * heads * splits * (head_dim + 2) * 4 if splits > 1 else 0
    return out + partials


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dot_in_fp32(q: torch.Tensor) -> bool:
    """fp32 inputs stay fp32 (ieee, not tf32); under the interpreter bf16 `tl.dot` is wrong, so cast."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreted())


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
