"""The C decode attention kernel against the torch reference, on scattered blocks, and the shard's choice."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.kernels import native as native_kernels
from mixserve.shards.kernels import paged_attention as kernel
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.ops.reference import paged_decode_attention

CPU = torch.device("cpu")


def _case(heads, kv_heads, head_dim, block_size, context_lens, seed=0):
    """Pools with every sequence's blocks scattered over them, and one query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in context_lens)
    num_blocks = 3 * width * len(context_lens) + 1
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[: width * len(context_lens)].view(len(context_lens), width)
    q = torch.randn(len(context_lens), heads, head_dim, generator=gen)
    return q, (k_pool, v_pool), tables, torch.tensor(context_lens)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [
        (8, 4, 32, 16),  # the demo model's shard at world size 1
        (32, 8, 128, 16),  # Mixtral 8x7B
        (4, 4, 32, 16),  # no grouping; four heads at a time
        (4, 2, 32, 16),  # the demo model's shard at world size 2
        (14, 2, 16, 16),  # eight heads, then four, then two one by one
        (6, 2, 24, 5),  # heads not a multiple of 8, head_dim not of 8, odd block size: scalar paths
        (16, 1, 64, 32),  # multi-query
    ],
)
@pytest.mark.parametrize("window", [None, 7, 40])
def test_kernel_equals_the_torch_path(native, heads, kv_heads, head_dim, block_size, window):
    q, cache, tables, lens = _case(heads, kv_heads, head_dim, block_size, [1, block_size, block_size + 1, 37, 130])
    scale = head_dim**-0.5
    expected = paged_decode_attention(q, cache, tables, lens, scale, window)
    got = kernel.paged_decode_attention(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kernel_reads_only_the_context(native):
    """Padding entries of the block table and slots past a sequence's length are never read."""
    q, (k_pool, v_pool), tables, lens = _case(8, 4, 32, 16, [20, 3])
    expected = kernel.paged_decode_attention(q, (k_pool, v_pool), tables, lens, 0.2, None)
    for b, n in enumerate(lens.tolist()):
        last = tables[b, (n - 1) // 16]
        k_pool[last, (n - 1) % 16 + 1 :] = float("nan")
        v_pool[last, (n - 1) % 16 + 1 :] = float("nan")
        k_pool[tables[b, -(-n // 16) :]] = float("nan")
        v_pool[tables[b, -(-n // 16) :]] = float("nan")
    torch.testing.assert_close(kernel.paged_decode_attention(q, (k_pool, v_pool), tables, lens, 0.2, None), expected)


def test_torch_choice_and_shapes_the_kernel_does_not_take(native, monkeypatch):
    q, cache, tables, lens = _case(8, 4, 32, 16, [5])
    calls = []
    real = kernel.paged_decode_attention
    monkeypatch.setattr(kernel, "paged_decode_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    native.paged_decode_attention(q, cache, tables, lens, 0.2)
    assert len(calls) == 1
    half = tuple(pool.half() for pool in cache)  # fp16: neither of the kernel's dtypes
    native.paged_decode_attention(q.half(), half, tables, lens, 0.2)
    many_heads = torch.zeros(1, kernel.MAX_HEADS + 4, 32)
    torch.testing.assert_close(
        native.paged_decode_attention(many_heads, cache, tables, lens, 0.2),
        paged_decode_attention(many_heads, cache, tables, lens, 0.2),
    )
    ops.select("torch", CPU, torch.float32).paged_decode_attention(q, cache, tables, lens, 0.2)
    assert len(calls) == 1


def test_native_fails_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("MIXSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("mixserve.shards.kernels.native._loaded", {})
    try:
        with pytest.raises(KernelUnavailable, match="no C compiler"):
            ops.select("native", CPU, torch.float32)
        chosen = ops.select("auto", CPU, torch.float32)  # auto falls back to torch
        assert set(chosen.backends.values()) == {"torch"} and chosen.decoder_layers_max_tokens == 0
    finally:
        monkeypatch.undo()
        ops.select("auto", CPU, torch.float32)


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        native_kernels.select("fast")
    with pytest.raises(ValueError, match="kernels must be one of"):
        ops.select("fast", CPU, torch.float32)


def test_loading_the_kernels_keeps_subnormal_floats(native):
    """-ffast-math at link time would turn on flush-to-zero in the whole shard process."""
    tiny = torch.tensor([1e-38], dtype=torch.float32) / 10  # subnormal in fp32
    assert tiny.item() != 0.0
    assert (tiny * 2).item() != 0.0
