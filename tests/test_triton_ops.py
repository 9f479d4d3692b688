"""The Triton kernels as the shard's ops (`--kernels triton`, shards/triton/ops.py), under the interpreter:
each op against the torch reference with its kernel running, the reference where a kernel does not
take the arguments, a model step and the decode graph runner's static path (`--cuda-graphs eager`)
through them with no host sync, and the decode attention's workspace, measured and at Mixtral's
shapes. Tiny shapes: the interpreter costs ~20-30 ms a kernel program.

Legend: h query heads, kv KV heads, d head dim.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it unless told otherwise
    pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from test_decode_graph import _RefuseHostSync, decode_after_prefill, warm_runner  # noqa: E402

from mixserve.shards import ops  # noqa: E402
from mixserve.shards.config import ParallelConfig  # noqa: E402
from mixserve.shards.demo.checkpoint import TINY  # noqa: E402 - the checkpoint of the interpreter_dir fixture
from mixserve.shards.distributed import TensorParallelGroup  # noqa: E402
from mixserve.shards.layers import moe as moe_layer  # noqa: E402
from mixserve.shards.loader import load_model  # noqa: E402
from mixserve.shards.memory import LiveBytes  # noqa: E402
from mixserve.shards.ops import reference  # noqa: E402
from mixserve.shards.triton import attention, moe, norm, rotary, routing  # noqa: E402

CPU = torch.device("cpu")
# (module, function) of every kernel wrapper the ops reach.
KERNELS = [
    (norm, "rms_norm"),
    (rotary, "rotary_write_kv"),
    (attention, "paged_decode_attention"),
    (attention, "paged_prefill_attention"),
    (routing, "topk_softmax"),
    (moe, "fused_moe"),
]


@pytest.fixture
def triton_selected():
    yield ops.select("triton", CPU, torch.float32)
    ops.select("auto", CPU, torch.float32)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the Triton wrappers called, in order (each still runs)."""
    calls: list[str] = []
    for module, name in KERNELS:
        real = getattr(module, name)

        def record(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, record)
    return calls


@pytest.fixture(scope="module")
def tiny_model(interpreter_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    return load_model(interpreter_dir, parallel, TensorParallelGroup(parallel))


def _pools(blocks: int, block_size: int, kv_heads: int, head_dim: int, gen: torch.Generator):
    shape = (blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_each_triton_op_runs_its_kernel_and_matches_the_reference(triton_selected, kernel_calls):
    chosen, gen = triton_selected, torch.Generator().manual_seed(0)
    assert {name for name, backend in chosen.backends.items() if backend == "triton"} == {name for _, name in KERNELS}
    x, residual, weight = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen), torch.rand(64)
    torch.testing.assert_close(chosen.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))
    for got, expected in zip(
        chosen.rms_norm(x, weight, 1e-5, residual), reference.rms_norm(x, weight, 1e-5, residual), strict=True
    ):
        torch.testing.assert_close(got, expected)

    # q, k, v as views of one projection, as the attention layer has them: h 4, kv 2, d 16.
    qkv = torch.randn(3, (4 + 2 + 2) * 16, generator=gen)
    q, k, v = (t.view(3, -1, 16) for t in qkv.split([64, 32, 32], dim=-1))
    cos, sin = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    positions, slots = torch.tensor([0, 7, 9]), torch.tensor([2, 21, 13])
    ours, theirs = _pools(6, 4, 2, 16, gen), _pools(6, 4, 2, 16, gen)
    theirs[0].copy_(ours[0]), theirs[1].copy_(ours[1])
    expected_q = reference.rotary_write_kv(positions, q.clone(), k.clone(), v, cos, sin, theirs, slots)
    torch.testing.assert_close(chosen.rotary_write_kv(positions, q, k, v, cos, sin, ours, slots), expected_q)
    torch.testing.assert_close(ours, theirs)

    q = torch.randn(2, 4, 16, generator=gen)
    tables, lens = torch.tensor([[1, 3, 0], [2, 4, 5]]), torch.tensor([6, 12])
    torch.testing.assert_close(
        chosen.paged_decode_attention(q, ours, tables, lens, 0.25, None),
        reference.paged_decode_attention(q, ours, tables, lens, 0.25, None),
    )
    q = torch.randn(7, 4, 16, generator=gen)
    query_start, starts = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    tables = torch.tensor([[1, 0, 0], [2, 4, 5]], dtype=torch.int32)
    prefill = (q, ours, query_start, starts, tables, 0.25, 4, [(3, 0), (4, 5)])
    torch.testing.assert_close(chosen.paged_prefill_attention(*prefill), reference.paged_prefill_attention(*prefill))

    logits = torch.randn(5, 8, generator=gen)
    for got, expected in zip(chosen.topk_softmax(logits, 2), reference.topk_softmax(logits, 2), strict=True):
        torch.testing.assert_close(got, expected)

    hidden, w13, w2 = torch.randn(5, 64, generator=gen), torch.randn(4, 64, 64), torch.randn(4, 64, 32)
    weights, experts = torch.rand(5, 2, generator=gen), torch.tensor([[0, 1], [2, 4], [1, 2], [4, 4], [3, 0]])
    torch.testing.assert_close(
        chosen.fused_moe(hidden, w13, w2, weights, experts),  # id 4: held by another rank
        reference.fused_moe(hidden, w13, w2, weights, experts),
        rtol=1e-4,
        atol=1e-4,
    )
    assert kernel_calls == [
        "rms_norm",
        "rms_norm",
        "rotary_write_kv",
        "paged_decode_attention",
        "paged_prefill_attention",
        "topk_softmax",
        "fused_moe",
    ]


def test_arguments_a_kernel_does_not_take_run_the_reference(triton_selected, kernel_calls, caplog):
    chosen, gen = triton_selected, torch.Generator().manual_seed(1)
    cache = _pools(6, 4, 2, 8, gen)  # head dim 8: under the attention kernels' 16
    q, tables, lens = torch.randn(2, 4, 8, generator=gen), torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 3])
    torch.testing.assert_close(
        chosen.paged_decode_attention(q, cache, tables, lens, 0.3, None),
        reference.paged_decode_attention(q, cache, tables, lens, 0.3, None),
    )
    x = torch.randn(3, 16, dtype=torch.float64)  # a dtype no kernel takes
    ones = torch.ones(16, dtype=torch.float64)
    torch.testing.assert_close(chosen.rms_norm(x, ones, 1e-5), reference.rms_norm(x, ones, 1e-5))
    assert kernel_calls == []
    assert "event=kernel_fallback op=paged_decode_attention" in caplog.text


def test_selection_refuses_kernels_built_for_the_other_device():
    """Compiled kernels cannot take CPU tensors, interpreted ones CUDA tensors: `triton` refuses at
    start-up rather than naming triton for ops that would all take the reference."""
    from mixserve.shards.kernels.native import KernelUnavailable

    with pytest.raises(KernelUnavailable, match="interpreted"):
        ops.select("triton", torch.device("cuda", 0), torch.bfloat16)
    assert ops.select("auto", torch.device("cuda", 0), torch.bfloat16).backends["fused_moe"] == "torch"
    ops.select("auto", CPU, torch.float32)


def test_the_static_decode_path_runs_the_triton_kernels_with_no_host_sync(tiny_model, kernel_calls, monkeypatch):
    """The decode graph runner's step (`--cuda-graphs eager`, the step CUDA graphs capture) with Triton
    ops: fused MoE, not the dense experts, and decode attention over the full table width (context
    lengths masking the rest), the same logits as the plain forward under the torch ops."""
    ops.select("torch", CPU, torch.float32)
    plain = warm_runner(tiny_model, "off")
    decodes = decode_after_prefill(plain)
    expected = plain.forward(decodes)

    # The dense experts are what a captured step takes without Triton's fused MoE: a call would fail.
    monkeypatch.setattr(moe_layer, "experts_dense", None)
    try:
        ops.select("triton", CPU, torch.float32)
        static = warm_runner(tiny_model, "eager", max_batch=4)
        assert decode_after_prefill(static) == decodes  # the prefill through the Triton kernels too
        kernel_calls.clear()
        with _RefuseHostSync():
            got = static.forward(decodes)
    finally:
        ops.select("auto", CPU, torch.float32)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    layers = TINY["num_hidden_layers"]
    assert kernel_calls.count("fused_moe") == kernel_calls.count("paged_decode_attention") == layers
    assert kernel_calls.count("rotary_write_kv") == layers and kernel_calls.count("rms_norm") == 2 * layers + 1


def test_decode_workspace_is_what_the_wrapper_allocates():
    """The bytes `decode_workspace_bytes` gives are those the Triton decode attention allocates, measured
    (the allocations of one call in one partition and split over two)."""
    gen = torch.Generator().manual_seed(2)
    cache = _pools(9, 4, 2, 16, gen)
    q, tables = torch.randn(3, 4, 16, generator=gen), torch.arange(1, 9).view(2, 4).repeat(2, 1)[:3]
    lens = torch.tensor([16, 9, 1])
    for partition, splits in [(32, 1), (None, 1)]:
        with LiveBytes() as meter:
            attention.paged_decode_attention(q, cache, tables, lens, 0.25, None, partition)
        assert meter.peak == attention.decode_workspace_bytes(3, 4, 16, splits, torch.float32)
    wide = torch.arange(1, 9).repeat(3, 2)[:, :16]  # 64 positions: two partitions of 32
    with LiveBytes() as meter:
        attention.paged_decode_attention(q, cache, wide, lens, 0.25, None, 32)
    assert meter.peak == attention.decode_workspace_bytes(3, 4, 16, 2, torch.float32)


def test_mixtral_decode_workspace_is_small_at_every_batch():
    """Mixtral-8x7B at rank 0 of 4 (h 8, kv 2, d 128, bf16), a decode graph's table as wide as 32k
    positions or a 4k context, on an A100 (108 SMs) and an H200 (132): the Triton decode attention
    allocates at most ~2 MiB a layer (its output, and split-K partials only where the batch does not
    fill the GPU), where the torch path's gathered, fp32-upcast K/V take over 12 GB at batch 256
    (tests/test_memory_sizing.py). On CUDA the sizer measures the step it runs, so with Triton its peak
    counts this workspace."""
    heads, kv_heads, head_dim = 8, 2, 128
    for sm_count in (108, 132):
        for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            for max_tokens in (4096, 32768):
                size = attention.decode_partition_size(batch, kv_heads, max_tokens, sm_count)
                splits = attention.decode_splits(max_tokens, size)
                workspace = attention.decode_workspace_bytes(batch, heads, head_dim, splits, torch.bfloat16)
                assert workspace <= 2 << 20, (sm_count, batch, max_tokens, splits)
    at_256 = attention.decode_partition_size(256, kv_heads, 4096, 132)
    assert attention.decode_splits(4096, at_256) == 1  # the batch fills the GPU: no partials
    assert attention.decode_workspace_bytes(256, heads, head_dim, 1, torch.bfloat16) == 256 * 8 * 128 * 2
