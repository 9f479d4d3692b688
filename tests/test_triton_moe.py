"""The fused MoE Triton kernels (shards/triton/moe.py) under the interpreter against
`shards.ops.reference.fused_moe`, the on-device alignment (shards/triton/moe_align.py) and the
routing kernel (shards/triton/routing.py) against `shards.ops.reference.topk_softmax`.

Legend: T tokens, H hidden size, I intermediate size, E experts held, K experts per token.
"""

import os
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from child_processes import PYTHON, subprocess_env
from mixserve.shards.ops import reference
from mixserve.shards.triton import moe_align
from mixserve.shards.triton.moe_align import align_pairs, max_sorted_rows

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it unless told otherwise
    pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1", allow_module_level=True)

from mixserve.shards.triton import moe, routing  # noqa: E402 - after the interpreter check

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5  # [E, 2I, H]
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5  # [E, H, I]
    return w13.to(dtype), w2.to(dtype)


def _check_against_oracle(experts: torch.Tensor, num_experts: int, hidden: int, inter: int, dtype: torch.dtype):
    tokens, top_k = experts.shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)  # [T, H]
    weights = torch.rand(tokens, top_k, generator=gen)  # [T, K]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    w13, w2 = _weights(num_experts, hidden, inter, dtype)
    out = moe.fused_moe(x, w13, w2, weights, experts)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    torch.testing.assert_close(out, reference.fused_moe(x, w13, w2, weights, experts), **TOLERANCES[dtype])
    return out


def _random_experts(tokens: int, top_k: int, choices: list[int], seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(choices), (tokens, top_k), generator=gen)
    return torch.tensor(choices)[pick]  # [T, K]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_routing_with_experts_held_elsewhere(dtype):
    experts = _random_experts(9, 2, [0, 1, 2, 3, 4])  # 4 == E_l: held by another rank
    _check_against_oracle(experts, 4, 32, 24, dtype)


@pytest.mark.parametrize("top_k", [1, 3])
def test_other_expert_counts_a_token(top_k):
    """K = 2 closes with one add; other K with a sum over K."""
    experts = _random_experts(6, top_k, [0, 1, 2, 3, 4])
    _check_against_oracle(experts, 4, 32, 24, torch.bfloat16)


def test_expert_without_tokens():
    experts = _random_experts(11, 2, [0, 2, 3]).int()  # int32 ids are taken as well
    _check_against_oracle(experts, 4, 32, 24, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_token_on_one_expert_over_several_blocks(dtype):
    experts = torch.full((37, 1), 2)  # 37 rows: three blocks of 16, the last padded
    _check_against_oracle(experts, 4, 32, 24, dtype)


def test_all_pairs_held_elsewhere_give_zeros():
    out = _check_against_oracle(torch.full((6, 2), 4), 4, 32, 24, torch.float32)
    assert not out.any()


@pytest.mark.parametrize(("num_experts", "top_k"), [(1, 1), (4, 1), (4, 2), (1, 2)])
def test_single_token(num_experts, top_k):
    experts = _random_experts(1, top_k, list(range(num_experts)))
    _check_against_oracle(experts, num_experts, 32, 24, torch.float16)


def test_dims_not_multiples_of_the_tiles():
    # H 144 > BLOCK_K 128 and I 80 > BLOCK_N 64: the loops' last tiles and the last columns are masked.
    experts = _random_experts(5, 2, [0, 1, 2, 3])
    _check_against_oracle(experts, 4, 144, 80, torch.float32)


@pytest.mark.parametrize(("tokens", "num_experts", "block_m"), [(40, 4, 32), (70, 2, 64)])
def test_prefill_sized_tiles(tokens, num_experts, block_m):
    assert moe.block_config(tokens * 2, num_experts, torch.float16).block_m == block_m
    experts = _random_experts(tokens, 2, list(range(num_experts + 1)))
    _check_against_oracle(experts, num_experts, 32, 24, torch.float16)


def test_alignment_pads_each_expert_to_whole_blocks():
    experts = torch.tensor([[3, 0], [0, 4], [3, 1], [4, 4], [0, 3]])  # E_l = 4, expert 2 empty, 4 elsewhere
    aligned = align_pairs(experts, 4, block_m=2)
    flat = experts.flatten()
    counts = torch.bincount(flat, minlength=5)[:4]
    assert aligned.total.tolist() == [int(((counts + 1) // 2 * 2).sum())]
    assert aligned.sorted_pairs.shape == (max_sorted_rows(10, 4, 2),)
    rows = aligned.sorted_pairs[: aligned.total.item()].view(-1, 2)  # [blocks, BLOCK_M]
    for block, pairs in enumerate(rows.tolist()):
        expert = aligned.block_expert[block].item()
        assert all(flat[p] == expert for p in pairs if p < 10)
        assert any(p < 10 for p in pairs)  # padding never fills a whole block
    assert aligned.block_expert.tolist()[: rows.shape[0]] == [0, 0, 1, 3, 3]
    assert (aligned.block_expert[rows.shape[0] :] == 4).all()
    assert (aligned.sorted_pairs[aligned.total.item() :] == 10).all()
    held = sorted(p for p in aligned.sorted_pairs.tolist() if p < 10)
    assert held == [p for p in range(10) if flat[p] < 4]


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (`.item()`, `.tolist()`, `bool(t)`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync():
    experts = _random_experts(7, 2, [0, 1, 2, 3])  # 3 == E_l
    w13, w2 = _weights(3, 32, 24, torch.float32)
    x, weights = torch.randn(7, 32), torch.rand(7, 2)
    with _NoHostSync():
        align_pairs(experts, 3, 16)
        moe.fused_moe(x, w13, w2, weights, experts)
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        experts.sum().item()  # the check itself can fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (8, 1), (6, 3), (4, 4)])
def test_routing_kernel_matches_the_reference(dtype, num_experts, top_k):
    """Softmax, top K (largest first) and renormalised weights in one program a token, against the
    torch path; 6 experts pad to a block of 8."""
    logits = torch.randn(7, num_experts, generator=torch.Generator().manual_seed(num_experts + top_k)).to(dtype)
    weights, experts = routing.topk_softmax(logits, top_k)
    want_weights, want_experts = reference.topk_softmax(logits, top_k)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64
    assert torch.equal(experts, want_experts)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(7))


def test_routing_kernel_breaks_ties_by_the_lower_expert_and_takes_strided_rows():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0]])
    weights, experts = routing.topk_softmax(logits, 2)
    assert experts.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(weights, torch.full((2, 2), 0.5))
    wide = torch.randn(5, 16)[:, :8]  # rows 16 apart
    torch.testing.assert_close(routing.topk_softmax(wide, 2)[0], reference.topk_softmax(wide, 2)[0])
    assert not routing.usable(torch.randn(3, 8).t(), 2)  # last dimension not contiguous
    assert not routing.usable(torch.randn(3, 4), 5) and not routing.usable(torch.randn(3, 8, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="topk_softmax"):
        routing.topk_softmax(torch.randn(3, 4), 5)


def _align_pairs_oracle(experts: torch.Tensor, num_experts: int, block_m: int) -> dict[str, list[int]]:
    """The alignment in torch ops (a stable sort, scans, a search): what the one-program kernel computes."""
    flat = experts.flatten().long()  # [P]
    num_pairs = flat.shape[0]
    rows = max_sorted_rows(num_pairs, num_experts, block_m)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]  # [E_l]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int32)
    for expert in range(num_experts):
        pairs = (flat == expert).nonzero().flatten()  # token order kept within an expert
        start = int(padded_end[expert] - padded[expert])
        sorted_pairs[start : start + len(pairs)] = pairs.to(torch.int32)
    block_starts = torch.arange(-(-rows // block_m)) * block_m
    return {
        "sorted_pairs": sorted_pairs.tolist(),
        "block_expert": torch.searchsorted(padded_end, block_starts, right=True).tolist(),
        "total": [int(padded.sum())],
    }


@pytest.mark.parametrize("chunk_elements", [moe_align.CHUNK_ELEMENTS, 64])
def test_alignment_kernel_matches_the_torch_oracle(monkeypatch, chunk_elements):
    """Random routings (pairs held elsewhere, expert counts not powers of two, block sizes from 2 to 64);
    a one-hot budget of 64 elements walks the pairs in chunks of 16, so the running counts carry over."""
    monkeypatch.setattr(moe_align, "CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(3)
    for case in range(12):
        tokens = int(torch.randint(1, 90, (1,), generator=gen))
        num_experts = int(torch.randint(1, 10, (1,), generator=gen))
        block_m = (2, 4, 16, 32, 64)[case % 5]
        experts = torch.randint(0, num_experts + 1, (tokens, 2), generator=gen)
        aligned = align_pairs(experts, num_experts, block_m)
        got = {name: getattr(aligned, name).tolist() for name in ("sorted_pairs", "block_expert", "total")}
        assert got == _align_pairs_oracle(experts, num_experts, block_m), (tokens, num_experts, block_m)


def test_bad_arguments_raise():
    x = torch.randn(3, 32)
    w13, w2 = _weights(2, 32, 24, torch.float32)
    weights, experts = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="dtype"):
        moe.fused_moe(x.half(), w13, w2, weights, experts)
    with pytest.raises(ValueError, match="float32"):
        moe.fused_moe(x, w13, w2, weights.half(), experts)
    with pytest.raises(ValueError, match="hidden size"):
        moe.fused_moe(x, w13, w2[:, :16], weights, experts)
    with pytest.raises(ValueError, match="K"):
        moe.fused_moe(x, w13, w2, weights, experts[:2])
    with pytest.raises(ValueError, match="contiguous"):
        moe.fused_moe(torch.randn(32, 3).t(), w13, w2, weights, experts)
    with pytest.raises(ValueError, match="int32 or int64"):
        moe.fused_moe(x, w13, w2, weights, experts.float())


def test_usable():
    w13, _ = _weights(2, 32, 24, torch.float16)
    assert moe.usable(torch.randn(3, 32).half(), w13)
    assert not moe.usable(torch.randn(3, 32), w13)
    assert not moe.usable(torch.randn(3, 32).half(), None)


# Compiles the fused MoE's kernels for sm80 with each tile of `block_config` (decode, mid, prefill
# rows per expert) in bf16 and fp32, and the routing and alignment programs for sm80 and sm90; each kernel's
# shared memory must fit an A100's (the measured tiles came from an H200, which has more).
_COMPILE = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixserve.shards.triton import moe, moe_align, routing

A100_SHARED = 166912
ints = {n: "i32" for n in ("num_pairs", "hidden_size", "inter_size", "stride_pt", "stride_we", "stride_wn")}
for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    pointers = {"sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "total_ptr": "*i32"}
    gate_up = {"hidden_ptr": f"*{name}", "w13_ptr": f"*{name}", "inter_ptr": f"*{name}", **pointers, **ints,
               "stride_ht": "i32"}
    down = {"inter_ptr": f"*{name}", "w2_ptr": f"*{name}", "weights_ptr": "*fp32", "out_ptr": f"*{name}", **pointers,
            **ints, "stride_ot": "i32"}
    for pairs in (2, 128, 8192):
        c = moe.block_config(pairs, 8, dtype)
        tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, DOT_FP32=False,
                     PRECISION="ieee" if dtype == torch.float32 else None)
        kernels = ((moe._gate_up_kernel, gate_up, dict(tiles, TOP_K=2)), (moe._down_kernel, down, tiles))
        for fn, signature, consts in kernels:
            source = ASTSource(fn, {**signature, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
            kernel = triton.compile(source, target=GPUTarget("cuda", 80, 32),
                                    options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            assert kernel.metadata.shared <= A100_SHARED, (name, c, kernel.metadata.shared)
route = {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "experts_ptr": "*i64", "num_experts": "i32",
         "stride_t": "i32"}
route_consts = dict(TOP_K=2, BLOCK_E=8)
for arch in (80, 90):
    source = ASTSource(routing._topk_softmax_kernel, {**route, **dict.fromkeys(route_consts, "constexpr")},
                       constexprs=route_consts)
    triton.compile(source, target=GPUTarget("cuda", arch, 32))
align = {"experts_ptr": "*i64", "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "total_ptr": "*i32",
         "num_pairs": "i32", "num_experts": "i32", "num_rows": "i32", "num_blocks": "i32"}
consts = dict(BLOCK_M=16, BLOCK_E=8, CHUNK=1024)
for arch in (80, 90):
    source = ASTSource(moe_align._align_kernel, {**align, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
    triton.compile(source, target=GPUTarget("cuda", arch, 32))
"""


@pytest.mark.slow
def test_kernels_compile_for_a100_within_its_shared_memory():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    result = subprocess.run(
        [PYTHON, "-c", _COMPILE],
        env=subprocess_env(TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
