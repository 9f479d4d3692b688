"""The C expert MLPs against the sort-by-expert torch path, and the fused_moe op's choice of them."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.kernels import moe as kernel
from mixserve.shards.layers.moe import held_expert_ids, route
from mixserve.shards.ops.reference import fused_moe


def _case(tokens, hidden, inter, experts, top_k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights, ids = route(x, torch.randn(experts, hidden, generator=gen), top_k)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("tokens", [1, 2, 7, 32, kernel.MAX_TOKENS, max(kernel.MAX_TOKENS_BY_VECTOR_FLOATS.values())])
@pytest.mark.parametrize(
    "hidden,inter,experts,top_k",
    [
        (256, 512, 8, 2),  # the demo model at world size 1
        (256, 128, 8, 2),  # its slice at world size 4
        (20, 12, 4, 3),  # widths that are not multiples of 8: the scalar paths
        (64, 40, 3, 1),  # 40: 8-float vectors where the machine has 16-float ones (AVX-512)
    ],
)
def test_kernel_equals_the_grouped_path(native, tokens, hidden, inter, experts, top_k):
    x, w13, w2, weights, ids = _case(tokens, hidden, inter, experts, top_k)
    expected = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(kernel.moe_experts(x, w13, w2, weights, ids), expected, rtol=1e-4, atol=1e-5)


def test_experts_held_elsewhere_are_skipped(native):
    """Expert parallelism: this rank holds experts 2 and 3 of 8; pairs routed to others add nothing."""
    x, w13, w2, weights, ids = _case(16, 64, 32, 8, 2)
    local = held_expert_ids(ids, 2, 2)
    assert (local == 2).any() and (local < 2).any()
    expected = fused_moe(x, w13[2:4], w2[2:4], weights, local)
    torch.testing.assert_close(kernel.moe_experts(x, w13[2:4], w2[2:4], weights, local), expected)


def test_the_op_takes_the_kernel_for_decode_sized_fp32_batches(native, monkeypatch):
    limit = kernel.max_tokens()
    assert limit in (kernel.MAX_TOKENS, *kernel.MAX_TOKENS_BY_VECTOR_FLOATS.values())
    x, w13, w2, weights, ids = _case(limit + 1, 64, 32, 4, 2)
    calls = []
    real = kernel.moe_experts
    monkeypatch.setattr(kernel, "moe_experts", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (x[:limit], x):  # the second is prefill-sized: MKL's GEMM in the reference
        torch.testing.assert_close(
            native.fused_moe(rows, w13, w2, weights[: len(rows)], ids[: len(rows)]),
            fused_moe(rows, w13, w2, weights[: len(rows)], ids[: len(rows)]),
            rtol=1e-4,
            atol=1e-5,
        )
    native.fused_moe(x[:4].double(), w13.double(), w2.double(), weights[:4], ids[:4])
    assert calls == [limit]
    ops.select("torch", torch.device("cpu"), torch.float32).fused_moe(x[:4], w13, w2, weights[:4], ids[:4])
    assert calls == [limit]
