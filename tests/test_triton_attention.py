"""The Triton paged attention kernels against the torch paths, run in Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported) or compiled on a GPU
when the interpreter is off. Shapes are tiny: the interpreter costs ~20-30 ms a program.

A last test compiles the kernels for A100 and H100 (ptxas, no GPU needed) in a child process
without the interpreter, so CI also checks the compiled path's typing and tile shapes.

Legend: h query heads, kv KV heads, d head dim, S block size.
"""

import subprocess
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from child_processes import PYTHON, subprocess_env  # noqa: E402
from mixserve.shards.ops import reference  # noqa: E402
from mixserve.shards.triton import attention  # noqa: E402

if attention.interpreted():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
else:
    pytest.skip("triton compiled (TRITON_INTERPRET unset when imported) and no GPU", allow_module_level=True)

# (h, kv, d, S): GQA ratio 1 with head dim 16 and blocks of 4; ratio 4 with head dim 32 and blocks of 16.
SHAPES = [(4, 4, 16, 4), (8, 2, 32, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against an fp32 reference on the same (rounded) inputs: the kernel's output is rounded to its dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _pools(kv_heads, head_dim, block_size, num_blocks, dtype, gen):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return tuple(torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2))


def _scattered_tables(num_blocks, rows, width, used, gen):
    """Tables [rows, width] pointing at shuffled blocks (never block 0) for each row's first `used[r]`
    entries and padded with block 0 after, as the runner pads them."""
    order = torch.randperm(num_blocks - 1, generator=gen)[: rows * width].view(rows, width) + 1
    tables = torch.zeros(rows, width, dtype=torch.int32)
    for r, n in enumerate(used):
        tables[r, :n] = order[r, :n]
    return tables.to(DEVICE)


def _decode_case(heads, kv_heads, head_dim, block_size, context_lens, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in context_lens) + 1  # one padding entry past the longest
    num_blocks = len(context_lens) * width + 1
    cache = _pools(kv_heads, head_dim, block_size, num_blocks, dtype, gen)
    used = [-(-n // block_size) for n in context_lens]
    tables = _scattered_tables(num_blocks, len(context_lens), width, used, gen)
    q = torch.randn(len(context_lens), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    return q, cache, tables, torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)


def _fp32(q, cache):
    return q.float(), tuple(pool.float() for pool in cache)


def _decode_lens(block_size):
    """Context 1, ending on a block boundary, one past it, a longer one: mixed in one padded batch.
    The longest spans several partitions of 32 at either block size (2 at S = 4, 5 at S = 16)."""
    return [1, block_size, block_size + 1, 2 * block_size, 8 * block_size + 3]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("partition_size", [None, 32], ids=["one-partition", "split"])
def test_decode_equals_the_torch_path(heads, kv_heads, head_dim, block_size, dtype, window, partition_size):
    q, cache, tables, lens = _decode_case(heads, kv_heads, head_dim, block_size, _decode_lens(block_size), dtype)
    scale = head_dim**-0.5
    expected = reference.paged_decode_attention(*_fp32(q, cache), tables.long(), lens.long(), scale, window)
    got = attention.paged_decode_attention(q, cache, tables, lens, scale, window, partition_size=partition_size)
    assert got.dtype == dtype and got.shape == q.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_decode_splits_the_context_into_several_partitions():
    """Blocks of 16, contexts up to 75, partitions of 32: three partitions, the last one partly empty
    for the short rows (a partial with no positions) and reduced by the second kernel."""
    q, cache, tables, lens = _decode_case(8, 2, 32, 16, [75, 3, 40], torch.float32)
    assert tables.shape[1] * 16 // 32 == 3
    expected = reference.paged_decode_attention(q, cache, tables, lens, 0.2, None)
    torch.testing.assert_close(
        attention.paged_decode_attention(q, cache, tables, lens, 0.2, partition_size=32), expected
    )


def test_decode_reads_only_the_context():
    """Slots past a sequence's length, the padding entries of its table (block 0) and, with a window,
    the positions before it are never read: NaN there changes nothing."""
    block_size, window = 4, 6
    q, (k_pool, v_pool), tables, lens = _decode_case(4, 2, 16, block_size, [13, 2], torch.float32)
    expected = attention.paged_decode_attention(q, (k_pool, v_pool), tables, lens, 0.25, window, partition_size=32)
    k_pool[0] = v_pool[0] = float("nan")
    for b, n in enumerate(lens.tolist()):
        for pos in [*range(0, max(0, n - window)), *range(n, tables.shape[1] * block_size)]:
            block = tables[b, pos // block_size]
            if block:
                k_pool[block, pos % block_size] = v_pool[block, pos % block_size] = float("nan")
    got = attention.paged_decode_attention(q, (k_pool, v_pool), tables, lens, 0.25, window, partition_size=32)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("partition_size", [None, 32], ids=["one-partition", "split"])
def test_decode_context_zero_gives_zeros(partition_size):
    """A padded row (context 0, as a batch padded up to a CUDA-graph bucket has) gives zeros, not NaN."""
    q, cache, tables, lens = _decode_case(4, 2, 16, 4, [6, 5], torch.float32)
    lens[1] = 0
    got = attention.paged_decode_attention(q, cache, tables, lens, 0.25, partition_size=partition_size)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    expected = reference.paged_decode_attention(q[:1], cache, tables[:1], lens[:1], 0.25)
    torch.testing.assert_close(got[:1], expected)


def test_decode_partitions_depend_on_shapes_alone():
    """On a GPU the partition size fills the SMs twice over and never goes below MIN_PARTITION;
    it is a function of (batch, KV heads, table width, SM count) only, so a CUDA graph's grid stays valid."""
    sm_count = 132
    for batch, kv_heads, max_tokens in [(1, 2, 4096), (8, 2, 1024), (64, 2, 1024), (256, 8, 4096), (1, 8, 64)]:
        size = attention.decode_partition_size(batch, kv_heads, max_tokens, sm_count)
        splits = attention.decode_splits(max_tokens, size)
        assert size >= attention.MIN_PARTITION and size & (size - 1) == 0
        assert batch * kv_heads * splits >= 264 or size == attention.MIN_PARTITION
    assert attention.decode_partition_size(1, 2, 4096, sm_count) == 128  # 32 splits x 2 KV heads
    assert attention.decode_partition_size(256, 8, 4096, sm_count) == 4096  # the batch fills the GPU alone
    assert attention.decode_partition_size(4, 2, 100, None) == 128  # the interpreter: one partition


def _prefill_case(heads, kv_heads, head_dim, block_size, chunks, dtype, seed=0):
    """Chunks given as (start position, length): their cached context and own K/V in the pools."""
    gen = torch.Generator().manual_seed(seed)
    used = [-(-(start + n) // block_size) for start, n in chunks]
    width = max(used) + 1
    num_blocks = len(chunks) * width + 1
    cache = _pools(kv_heads, head_dim, block_size, num_blocks, dtype, gen)
    tables = _scattered_tables(num_blocks, len(chunks), width, used, gen)
    query_start = [0]
    for _, n in chunks:
        query_start.append(query_start[-1] + n)
    q = torch.randn(query_start[-1], heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    as_int32 = {"dtype": torch.int32, "device": DEVICE}
    starts = torch.tensor([start for start, _ in chunks], **as_int32)
    return q, cache, torch.tensor(query_start, **as_int32), starts, tables


def _prefill_chunks(block_size):
    """A prompt from position 0; a second chunk (or prefix-cache hit) starting on a block boundary and
    one starting one past it; one token; chunk lengths differing, all in one call."""
    return [(0, 9), (block_size, 6), (2 * block_size + 1, 3), (3, 1)]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_equals_the_torch_path(heads, kv_heads, head_dim, block_size, dtype, window):
    chunks = _prefill_chunks(block_size)
    q, cache, query_start, starts, tables = _prefill_case(heads, kv_heads, head_dim, block_size, chunks, dtype)
    scale = head_dim**-0.5
    expected = reference.paged_prefill_attention(*_fp32(q, cache), query_start, starts, tables, scale, window)
    got = attention.paged_prefill_attention(
        q, cache, query_start, starts, tables, scale, window, max_chunk_len=max(n for _, n in chunks)
    )
    assert got.dtype == dtype and got.shape == q.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_prefill_long_chunk_spans_several_tiles(dtype):
    """A chunk longer than a query tile (BLOCK_Q = 64 / G_PAD tokens) at an offset, its keys over
    several key tiles (32 for fp32, 64 otherwise), the grid sized from q's length (max_chunk_len
    left out): tiles past the shorter chunk's end write nothing."""
    chunks = [(70, 40), (0, 3)]
    q, cache, query_start, starts, tables = _prefill_case(8, 2, 16, 4, chunks, dtype)
    expected = reference.paged_prefill_attention(*_fp32(q, cache), query_start, starts, tables, 0.25, None)
    got = attention.paged_prefill_attention(q, cache, query_start, starts, tables, 0.25)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_prefill_reads_only_the_context():
    """Slots past each chunk's last token, the padding entries of its table and, with a window,
    positions before the first query's window are never read."""
    block_size, window = 4, 3
    chunks = [(6, 5), (0, 2)]
    q, (k_pool, v_pool), query_start, starts, tables = _prefill_case(4, 2, 16, block_size, chunks, torch.float32)
    cache = (k_pool, v_pool)
    expected = attention.paged_prefill_attention(q, cache, query_start, starts, tables, 0.25, window)
    k_pool[0] = v_pool[0] = float("nan")
    for p, (start, n) in enumerate(chunks):
        for pos in [*range(0, max(0, start - window + 1)), *range(start + n, tables.shape[1] * block_size)]:
            block = tables[p, pos // block_size]
            if block:
                k_pool[block, pos % block_size] = v_pool[block, pos % block_size] = float("nan")
    got = attention.paged_prefill_attention(q, cache, query_start, starts, tables, 0.25, window)
    torch.testing.assert_close(got, expected)


def test_usable():
    q, (k_pool, _), _, _ = _decode_case(4, 2, 16, 4, [3], torch.float16)
    on_cpu = DEVICE.type == "cpu"
    assert attention.usable(q, k_pool, interpreter=on_cpu)
    assert not attention.usable(q, k_pool.float(), interpreter=on_cpu)  # dtypes differ
    assert not attention.usable(q.int(), k_pool.int(), interpreter=on_cpu)
    odd = torch.zeros(1, 4, 24, dtype=torch.float16, device=DEVICE)  # head dim not a power of two
    assert not attention.usable(odd, torch.zeros(2, 4, 2, 24, dtype=torch.float16, device=DEVICE), on_cpu)
    assert not attention.usable(q, torch.zeros(2, 4, 3, 16, dtype=torch.float16, device=DEVICE), on_cpu)  # 4 % 3
    if on_cpu:
        assert not attention.usable(q, k_pool)  # the interpreter is never taken unless asked for


def test_bad_arguments_raise():
    q, cache, tables, lens = _decode_case(4, 2, 16, 4, [3, 5], torch.float32)
    decode = attention.paged_decode_attention
    with pytest.raises(ValueError, match="dtypes"):
        decode(q.half(), cache, tables, lens, 0.25)
    with pytest.raises(ValueError, match="2 queries"):
        decode(q, cache, tables[:1], lens, 0.25)
    with pytest.raises(ValueError, match="context_lens"):
        decode(q, cache, tables, lens.float(), 0.25)
    with pytest.raises(ValueError, match="heads"):
        decode(q[:, :3], cache, tables, lens, 0.25)
    with pytest.raises(ValueError, match="partition_size"):
        decode(q, cache, tables, lens, 0.25, partition_size=48)
    with pytest.raises(ValueError, match="sliding_window"):
        decode(q, cache, tables, lens, 0.25, 0)
    with pytest.raises(ValueError, match="devices"):
        decode(q, cache, tables.to("meta"), lens, 0.25)
    q, cache, query_start, starts, tables = _prefill_case(4, 2, 16, 4, [(0, 3), (2, 2)], torch.float32)
    prefill = attention.paged_prefill_attention
    with pytest.raises(ValueError, match="query_start"):
        prefill(q, cache, query_start[:-1], starts, tables, 0.25)
    with pytest.raises(ValueError, match="max_chunk_len"):
        prefill(q, cache, query_start, starts, tables, 0.25, max_chunk_len=q.shape[0] + 1)
    with pytest.raises(ValueError, match="block tables"):
        prefill(q, cache, query_start, starts, tables.float(), 0.25)


# Compiles each kernel once for sm80 and sm90 with the shapes of Mixtral at 4 ranks (8 query heads,
# 2 KV heads, head dim 128, blocks of 16), the tile sizes the wrappers launch with.
_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixserve.shards.triton import attention as A
from mixserve.shards.triton import attention_kernels as K

assert not A.interpreted()
STRIDES = ["stride_kn", "stride_ks", "stride_kh", "stride_vn", "stride_vs", "stride_vh", "stride_tb"]

def compile_for(target, fn, args, consts, num_warps=4):
    signature = {**args, **{name: "i32" for name in STRIDES}, **{name: "constexpr" for name in consts}}
    triton.compile(ASTSource(fn, signature, constexprs=consts), target=target, options={"num_warps": num_warps})

for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    for dtype, dot_fp32 in (("bf16", False), ("fp32", True)):
        common = dict(GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, HAS_WINDOW=True, DOT_FP32=dot_fp32)
        pools = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "tables_ptr": "*i32"}
        decode = {**pools, "context_lens_ptr": "*i32", "out_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32",
                  "scale": "fp32", "window": "i32", "partition_size": "i32", "num_splits": "i32",
                  "stride_qb": "i32", "stride_qh": "i32"}
        compile_for(target, K.decode_partition_kernel, decode,
                    dict(common, GROUP_PAD=16, BLOCK_N=A.DECODE_BLOCK_N, DIRECT=False))
        prefill = {**pools, "query_start_ptr": "*i32", "start_positions_ptr": "*i32", "out_ptr": f"*{dtype}",
                   "scale": "fp32", "window": "i32", "stride_qt": "i32", "stride_qh": "i32"}
        block_n = A.PREFILL_BLOCK_N_FP32 if dot_fp32 else A.PREFILL_BLOCK_N
        compile_for(target, K.prefill_kernel, prefill,
                    dict(common, GROUP_PAD=4, BLOCK_Q=A.PREFILL_BLOCK_M // 4, BLOCK_N=block_n), A.PREFILL_WARPS)
    reduce = {"partial_out_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "out_ptr": "*bf16",
              "num_splits": "i32"}
    triton.compile(ASTSource(K.decode_reduce_kernel, {**reduce, "HEAD_DIM": "constexpr", "SPLITS_PAD": "constexpr"},
                             constexprs=dict(HEAD_DIM=128, SPLITS_PAD=64)), target=target)
"""


@pytest.mark.slow
def test_kernels_compile_for_a100_and_h100():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    result = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(_COMPILE)],
        env=subprocess_env(TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
