"""Both MoE compute paths against the dense all-experts oracle, and the routing against transformers'."""

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mixserve.shards.layers.moe import experts_gathered, route
from mixserve.shards.ops.reference import fused_moe

E, H, I, K = 8, 32, 48, 2


def dense_oracle(hidden, w13, w2, weights, experts):
    """Every expert on every token, weighted by the routing weight (0 where not chosen)."""
    out = torch.zeros_like(hidden)
    for e in range(w13.shape[0]):
        gate, up = F.linear(hidden, w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])  # [T, H]
        weight = (weights * (experts == e)).sum(dim=-1, keepdim=True)  # [T, 1]
        out += y * weight
    return out


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(E, H, generator=g),
        torch.randn(E, 2 * I, H, generator=g) / H**0.5,
        torch.randn(E, H, I, generator=g) / I**0.5,
    )


@pytest.mark.parametrize("tokens", [1, 2, 5, 64])
@pytest.mark.parametrize("path", [fused_moe, experts_gathered])
def test_paths_equal_dense_oracle(weights, tokens, path):
    gate, w13, w2 = weights
    hidden = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
    routing, experts = route(hidden, gate, K)
    torch.testing.assert_close(path(hidden, w13, w2, routing, experts), dense_oracle(hidden, w13, w2, routing, experts))


def test_routing_and_experts_match_transformers(weights):
    gate, w13, w2 = weights
    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        block.gate.weight.copy_(gate)
        block.experts.gate_up_proj.copy_(w13)
        block.experts.down_proj.copy_(w2)
    hidden = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(1))
    flat = hidden.view(-1, H)
    routing, experts = route(flat, gate, K)
    with torch.no_grad():
        expected = block(hidden).view(-1, H)
    torch.testing.assert_close(fused_moe(flat, w13, w2, routing, experts), expected)
