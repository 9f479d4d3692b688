"""The sync-free dense MoE path against the sort-by-expert path, with experts held elsewhere (ep) skipped."""

import pytest
import torch

from mixserve.shards.layers.dense_experts import experts_dense
from mixserve.shards.layers.moe import held_expert_ids, route
from mixserve.shards.ops import reference

E, H, I, K = 8, 32, 48, 2


def weights(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(E, H, generator=g)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    return gate, w13, w2


@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_equals_the_grouped_path(tokens, dtype):
    gate, w13, w2 = weights(dtype)
    hidden = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    routing, experts = route(hidden, gate.to(dtype), K)
    expected = reference.fused_moe(hidden, w13, w2, routing, experts)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        experts_dense(hidden, w13, w2, routing, experts), expected, atol=tolerance, rtol=tolerance
    )


def test_experts_held_elsewhere_get_no_weight():
    gate, w13, w2 = weights(torch.float32)
    hidden = torch.randn(16, H, generator=torch.Generator().manual_seed(1))
    routing, experts = route(hidden, gate, K)
    held = held_expert_ids(experts, first=4, count=4)  # this rank holds experts 4..7
    local_w13, local_w2 = w13[4:], w2[4:]
    expected = reference.fused_moe(hidden, local_w13, local_w2, routing, held)
    torch.testing.assert_close(experts_dense(hidden, local_w13, local_w2, routing, held), expected)
    assert (held == 4).any() and (held < 4).any()  # both kinds of pair are present
