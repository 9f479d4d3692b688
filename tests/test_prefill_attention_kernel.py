"""The C prefill attention kernel (a chunk of consecutive positions of one sequence, scores and values as small
matrix products over tiles of 16 positions) against the torch reference, on scattered blocks, in the
machine's own build and in plain C (where it attends row by row); the decoder-layer kernel's split of a
step's rows into prefill runs and decode rows; and the op the CPU backend runs for prefill chunks."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.kernels import moe, paged_attention, prefill_attention
from mixserve.shards.kernels import native as native_kernels
from mixserve.shards.ops import cpu, reference

CPU = torch.device("cpu")
# prefill_attention.c: runs of rows at least this long take the tiled kernel inside the decoder-layer kernel.
PREFILL_MIN_ROWS = 32


@pytest.fixture(params=["own", "plain-c"])
def build(request, monkeypatch, native):
    """The kernels built for this machine, then without AVX2 (every row through the decode kernel)."""
    if request.param == "plain-c":
        monkeypatch.setenv("MIXSERVE_KERNEL_CFLAGS", "-mno-avx2 -mno-fma")
        native_kernels.forget_loaded()
        ops.select("native", CPU, torch.float32)
    yield request.param
    if request.param == "plain-c":
        monkeypatch.delenv("MIXSERVE_KERNEL_CFLAGS")
        native_kernels.forget_loaded()
        ops.select("native", CPU, torch.float32)


def _pools(kv_heads, head_dim, block_size, positions, dtype=torch.float32, seed=0):
    """Pools holding one sequence's first `positions` positions in scattered blocks, and its block table."""
    gen = torch.Generator().manual_seed(seed)
    width = -(-positions // block_size)
    num_blocks = 3 * width + 2
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[:width]
    return (k_pool, v_pool), table


def _expected(q, cache, table, start, scale, window):
    chunks = [(q.shape[0], start)]
    return reference.paged_prefill_attention(
        q,
        cache,
        torch.tensor([0, q.shape[0]], dtype=torch.int32),
        torch.tensor([start], dtype=torch.int32),
        table.unsqueeze(0),
        scale,
        window,
        chunks,
    )


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [
        (4, 2, 32, 16),  # the demo model's shard at world size 2
        (8, 2, 128, 16),  # issue 20's 0.8B
        (32, 8, 128, 16),  # Mixtral 8x7B
        (4, 4, 40, 16),  # no grouping; a head dim of five vectors (the values' last eight alone)
        (16, 2, 64, 32),  # eight query heads a KV head, two tiles a block
        (6, 2, 24, 5),  # a block size that cuts tiles anywhere
        (6, 3, 12, 16),  # a head dim that is not a multiple of 8: row by row
    ],
)
@pytest.mark.parametrize("start,tokens", [(0, 1), (0, 45), (37, 5), (130, 70)])
@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_equals_the_torch_path(build, heads, kv_heads, head_dim, block_size, start, tokens, window, dtype):
    cache, table = _pools(kv_heads, head_dim, block_size, start + tokens, dtype)
    q = torch.randn(tokens, heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5
    got = prefill_attention.paged_prefill_attention(q, cache, table, start, scale, window)
    torch.testing.assert_close(got, _expected(q, cache, table, start, scale, window), rtol=1e-5, atol=1e-5)


def test_kernel_reads_only_the_context(native):
    """Positions past the chunk's last one and blocks past its table's needed ones are never read."""
    (k_pool, v_pool), table = _pools(2, 32, 16, 80)
    q = torch.randn(50, 4, 32)
    expected = prefill_attention.paged_prefill_attention(q, (k_pool, v_pool), table, 20, 0.2, None)
    last = table[(70 - 1) // 16]
    for pool in (k_pool, v_pool):
        pool[last, (70 - 1) % 16 + 1 :] = float("nan")
        pool[table[-(-70 // 16) :]] = float("nan")
    torch.testing.assert_close(
        prefill_attention.paged_prefill_attention(q, (k_pool, v_pool), table, 20, 0.2, None), expected
    )


def test_a_rows_bits_do_not_depend_on_its_chunk(native):
    """Tiles sit at absolute positions: a position's output is the same whichever chunk it is attended in."""
    cache, table = _pools(2, 128, 16, 300)
    q = torch.randn(300, 8, 128)
    whole = prefill_attention.paged_prefill_attention(q, cache, table, 0, 0.1, None)
    for begin, end in ((0, 33), (33, 200), (200, 300), (117, 118)):
        part = prefill_attention.paged_prefill_attention(q[begin:end].contiguous(), cache, table, begin, 0.1, None)
        assert torch.equal(part, whole[begin:end])


def test_the_kernel_refuses_what_it_cannot_read(native):
    cache, table = _pools(2, 32, 16, 40)
    q = torch.randn(10, 4, 32)
    with pytest.raises(ValueError, match="past its block-table row"):
        prefill_attention.paged_prefill_attention(q, cache, table, 40, 0.2, None)
    bad = table.clone()
    bad[0] = cache[0].shape[0]
    with pytest.raises(ValueError, match="block id outside the pools"):
        prefill_attention.paged_prefill_attention(q, cache, bad, 0, 0.2, None)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill_attention.paged_prefill_attention(torch.randn(10, 3, 32), cache, table, 0, 0.2, None)
    with pytest.raises(TypeError):
        prefill_attention.paged_prefill_attention(q.half(), cache, table, 0, 0.2, None)


def _attention_rows():
    fn = native_kernels.function("prefill_attention", "paged_attention_rows", paged_attention._ARGTYPES)
    assert fn is not None

    def call(q, cache, tables, lens, scale):
        k_pool, v_pool = cache
        out = torch.empty_like(q)
        status = fn(
            q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), 0, tables.data_ptr(), lens.data_ptr(),
            out.data_ptr(), *(q.shape[0], q.shape[1], k_pool.shape[2], q.shape[2], k_pool.shape[1]),
            *(tables.shape[1], k_pool.shape[0], scale, 0),
        )  # fmt: skip
        assert status == 0
        return out

    return call


def test_the_layer_kernels_rows_take_the_prefill_kernel_in_long_runs_only(native):
    """A step's rows as the decoder-layer kernel gets them (each its own table row and context): runs of
    PREFILL_MIN_ROWS consecutive positions of one sequence take the prefill kernel (its bits); shorter runs,
    such as a speculative verification's rows, and decode rows keep the decode kernel's bits."""
    cache, table = _pools(2, 32, 16, 200)
    long_run, short_run = PREFILL_MIN_ROWS + 8, PREFILL_MIN_ROWS - 1
    lens = [7, *range(100, 100 + long_run), 150, *range(20, 20 + short_run), 60]
    width = table.shape[0]
    tables = torch.stack([table] * len(lens))
    tables[0, 1:] = 0  # a decode row's padded table
    q = torch.randn(len(lens), 4, 32)
    lens_t = torch.tensor(lens)
    got = _attention_rows()(q, cache, tables, lens_t, 0.2)
    by_row = paged_attention.paged_decode_attention(q, cache, tables, lens_t, 0.2, None)
    prefill = prefill_attention.paged_prefill_attention(q[1 : 1 + long_run], cache, table, 99, 0.2, None)
    assert torch.equal(got[1 : 1 + long_run], prefill)
    assert not torch.equal(prefill, by_row[1 : 1 + long_run])  # another order of sums: other bits
    torch.testing.assert_close(prefill, by_row[1 : 1 + long_run], rtol=1e-5, atol=1e-5)
    others = [0, *range(1 + long_run, len(lens))]
    assert torch.equal(got[others], by_row[others])
    assert width * 16 >= max(lens)


def test_the_cpu_backend_chooses_it_where_its_vectors_are_the_widest(native):
    """AVX2 builds (8-float vectors, where it was measured against torch's flash attention) run the op in the
    kernel; AVX-512 and plain C builds keep torch's."""
    width = moe.vector_floats()
    assert native.backends["paged_prefill_attention"] == ("native" if width == 8 else "torch")


def test_the_cpu_backends_op_runs_chunks_in_it(native, monkeypatch):
    """The op of the CPU backend (wherever chosen): several chunks in one call, each through the kernel; bf16
    queries widened and the result rounded back; shapes past the kernel's limits through the torch path."""
    cache, table = _pools(2, 32, 16, 120)
    tables = torch.stack([table, table])
    q = torch.randn(70, 4, 32)
    chunks = [(40, 0), (30, 90)]
    query_start = torch.tensor([0, 40, 70], dtype=torch.int32)
    starts = torch.tensor([0, 90], dtype=torch.int32)
    calls = []
    real = prefill_attention.paged_prefill_attention
    monkeypatch.setattr(prefill_attention, "paged_prefill_attention", lambda *a: calls.append(a[3]) or real(*a))
    got = cpu.paged_prefill_attention(q, cache, query_start, starts, tables, 0.2, None, chunks)
    assert calls == [0, 90]
    expected = reference.paged_prefill_attention(q, cache, query_start, starts, tables, 0.2, None, chunks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Without the host's chunks the op reads them from the tensors.
    torch.testing.assert_close(cpu.paged_prefill_attention(q, cache, query_start, starts, tables, 0.2), got)
    bf16 = cpu.paged_prefill_attention(q.bfloat16(), cache, query_start, starts, tables, 0.2, None, chunks)
    assert bf16.dtype is torch.bfloat16 and len(calls) == 6
    torch.testing.assert_close(bf16.float(), got, rtol=2e-2, atol=2e-2)
    half = tuple(pool.half() for pool in cache)  # fp16: neither of the kernel's dtypes
    cpu.paged_prefill_attention(q.half(), half, query_start, starts, tables, 0.2, None, chunks)
    assert len(calls) == 6
