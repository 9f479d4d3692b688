"""The C RMSNorm and rotary embedding against the layers' torch paths."""

import pytest
import torch

from shards.kernels import elementwise
from shards.kernels import native as native_kernels
from shards.layers.norm import RMSNorm
from shards.layers.rotary import RotaryEmbedding


def _torch_path(fn):
    native_kernels.select("torch")
    try:
        return fn()
    finally:
        native_kernels.select("native", native_kernels.LIBRARIES)


@pytest.mark.parametrize("tokens,hidden", [(1, 256), (7, 20), (33, 4096)])
def test_rms_norm_equals_torch(native, tokens, hidden):
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden)
    x = torch.randn(tokens, hidden) * 3
    torch.testing.assert_close(norm(x), _torch_path(lambda: norm(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 32), (32, 8, 128), (3, 1, 6)])
def test_rotary_equals_torch_on_views_of_the_qkv_projection(native, heads, kv_heads, head_dim):
    tokens = 5
    rotary = RotaryEmbedding(head_dim, 64, 10000.0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)  # strided views, as Attention has
    positions = torch.tensor([0, 1, 17, 40, 63])
    got = rotary(positions, q, k)
    expected = _torch_path(lambda: rotary(positions, q, k))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_other_inputs_take_the_torch_path(native):
    assert elementwise.rms_norm(torch.randn(2, 8).double(), torch.randn(8).double(), 1e-5) is None
    assert elementwise.rms_norm(torch.randn(2, 3, 8), torch.randn(8), 1e-5) is None
    table = torch.randn(8, 4)
    assert elementwise.rotary(torch.tensor([1]), torch.randn(1, 2, 4).double(), table.double(), table.double()) is None
    with pytest.raises(ValueError, match="position past 8"):
        elementwise.rotary(torch.tensor([8]), torch.randn(1, 2, 4), table, table)
