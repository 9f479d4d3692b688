"""Triton kernels of attention over the paged KV cache; the wrappers in attention.py launch them.

Legend: B decoding sequences, P prefill chunks, T query tokens, h query heads, kv KV heads,
G = h / kv query heads per KV head (the GQA group), G_PAD the group padded to a power of two,
d head dim, N blocks, S block size (token slots per block), M block-table width.
Pools are [N, S, kv, d]; a token at position `pos` of a sequence lives in block
`table[pos // S]`, slot `pos % S`. Keys and values are read in place, one tile of BLOCK_N positions
at a time (each row finds its own block, so S need not divide or equal BLOCK_N).

Why the GQA tile: the G query heads of one KV head read the same keys and values, so one program
takes the whole group as the rows of its query tile. K/V are then read once per group instead of
once per head, and the scores are one `tl.dot` ([rows, d] x [d, BLOCK_N]) on the tensor cores.

Why split-K (flash-decoding) for decode: a decode step has one query per sequence, so one program
per (sequence, KV head) leaves most of the GPU idle at small batch and long context. The context is
cut into partitions, each program attends to one and writes its partial (max, sum, unnormalised
output); a second small kernel rescales the partials to a common max and adds them up.

Softmax is the online (streaming) form in fp32: m the running max, l the running sum of
exp(score - m), acc the running sum of exp(score - m) * v. With DOT_FP32 the tiles are cast to fp32
before `tl.dot` (fp32 inputs, and the interpreter, whose bf16 `tl.dot` is wrong:
triton-lang/triton#11584); otherwise fp16/bf16 tiles go to the tensor cores with fp32 accumulation.
"""

import triton
import triton.language as tl


@triton.jit
def decode_partition_kernel(
    q_ptr,  # [B, h, d]
    k_ptr,  # [N, S, kv, d]
    v_ptr,  # [N, S, kv, d]
    tables_ptr,  # [B, M]
    context_lens_ptr,  # [B]
    out_ptr,  # [B, h, d] when DIRECT, else the partial outputs [B, h, splits, d] fp32
    max_ptr,  # [B, h, splits] fp32 (unused when DIRECT)
    sum_ptr,  # [B, h, splits] fp32 (unused when DIRECT)
    scale,
    window,
    partition_size,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One program: sequence b, KV head g, context partition s; the group's G query heads as rows."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    context = tl.load(context_lens_ptr + b)
    start = s * partition_size
    if HAS_WINDOW:
        # Mistral's window: the query at position context - 1 sees keys at positions > its own - window.
        start = tl.maximum(start, context - window)
    end = tl.minimum((s + 1) * partition_size, context)

    num_heads = tl.num_programs(1) * GROUP
    rows = tl.arange(0, GROUP_PAD)  # [G_PAD]
    heads = g * GROUP + rows
    head_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)  # [d]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=head_ok[:, None], other=0.0
    )  # [G_PAD, d]
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for first in range(start, end, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < end
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k_rows = block * stride_kn + slot * stride_ks + g * stride_kh
        v_rows = block * stride_vn + slot * stride_vs + g * stride_vh
        k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, d]
        v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, d]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [G_PAD, BLOCK_N]
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        # Every tile holds a valid position (the loop stops before `end`), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)  # [G_PAD]
        p = tl.exp(scores - m_new[:, None])  # [G_PAD, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if DIRECT:
        # One partition: normalise here and skip the reduction. A sequence with context 0 (a padded
        # row) has l = 0 and gets zeros instead of NaN.
        out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        out_offsets = (b * num_heads + heads)[:, None] * HEAD_DIM + dims[None, :]  # out is [B, h, d]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        # An empty partition (past the context, or before the window) stores m = -inf, l = 0, acc = 0.
        part = (b * num_heads + heads) * num_splits + s  # [G_PAD] index into [B, h, splits]
        tl.store(max_ptr + part, m_i, mask=head_ok)
        tl.store(sum_ptr + part, l_i, mask=head_ok)
        tl.store(out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None])


@triton.jit
def decode_reduce_kernel(
    partial_out_ptr,  # [B, h, splits, d] fp32
    max_ptr,  # [B, h, splits] fp32
    sum_ptr,  # [B, h, splits] fp32
    out_ptr,  # [B, h, d]
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """One program: sequence b, query head; rescales the partitions' partials to their common max."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)  # b * h + head
    splits = tl.arange(0, SPLITS_PAD)  # [SPLITS_PAD]
    split_ok = splits < num_splits
    maxes = tl.load(max_ptr + row * num_splits + splits, mask=split_ok, other=float("-inf"))
    global_max = tl.max(maxes, 0)
    # A context-0 row has every partition empty: a finite max keeps exp() from making NaN.
    global_max = tl.where(global_max == float("-inf"), 0.0, global_max)
    weights = tl.exp(maxes - global_max)  # [SPLITS_PAD]; 0 for empty partitions
    sums = tl.load(sum_ptr + row * num_splits + splits, mask=split_ok, other=0.0)
    total = tl.sum(weights * sums, 0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s in range(0, num_splits):
        weight = tl.exp(tl.load(max_ptr + row * num_splits + s) - global_max)
        acc += weight * tl.load(partial_out_ptr + (row * num_splits + s) * HEAD_DIM + dims)
    out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def prefill_kernel(
    q_ptr,  # [T, h, d]
    k_ptr,  # [N, S, kv, d]
    v_ptr,  # [N, S, kv, d]
    tables_ptr,  # [P, M]
    query_start_ptr,  # [P + 1]
    start_positions_ptr,  # [P]
    out_ptr,  # [T, h, d] contiguous
    scale,
    window,
    stride_qt,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One program: chunk p, BLOCK_Q of its query tokens, KV head g. The tile's rows are
    (token, head of the group) pairs, BLOCK_Q * G_PAD of them, token-major: one K/V read serves them all.
    """
    p = tl.program_id(0)
    tile = tl.program_id(1)
    g = tl.program_id(2)
    num_heads = tl.num_programs(2) * GROUP
    q_begin = tl.load(query_start_ptr + p)
    chunk_len = tl.load(query_start_ptr + p + 1) - q_begin
    start_position = tl.load(start_positions_ptr + p)

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)  # [BLOCK_M]
    token = tile * BLOCK_Q + rows // GROUP_PAD  # [BLOCK_M] index in the chunk
    head = rows % GROUP_PAD
    row_ok = (token < chunk_len) & (head < GROUP)
    dims = tl.arange(0, HEAD_DIM)  # [d]
    q_offsets = (q_begin + token)[:, None] * stride_qt + (g * GROUP + head)[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, d]
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = start_position + token  # [BLOCK_M]

    # Keys from the window start of the tile's first token to the tile's last token (causal). A tile
    # wholly past the chunk's end (the grid is sized for the longest chunk) reads nothing.
    first_token = tile * BLOCK_Q
    last_token = tl.minimum(first_token + BLOCK_Q, chunk_len) - 1
    end = tl.where(first_token < chunk_len, start_position + last_token + 1, 0)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(start_position + first_token - window + 1, 0)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    for first in range(start, end, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < end
        block = tl.load(tables_ptr + p * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k_rows = block * stride_kn + slot * stride_ks + g * stride_kh
        v_rows = block * stride_vn + slot * stride_vs + g * stride_vh
        k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, d]
        v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, d]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        else:
            scores = tl.dot(q, tl.trans(k))
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])  # causal, offset by the start position
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row may see nothing in this tile (all before its window) while m is still -inf: subtract 0
        # then, so exp() gives 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # [BLOCK_M]
        weights = tl.exp(scores - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(weights, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(weights, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    out_offsets = ((q_begin + token) * num_heads + g * GROUP + head)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
