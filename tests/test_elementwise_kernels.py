"""The C RMSNorm and rotary embedding against the torch references."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.layers.norm import RMSNorm
from mixserve.shards.layers.rotary import RotaryEmbedding

CPU = torch.device("cpu")


def _torch_path(fn):
    ops.select("torch", CPU, torch.float32)
    try:
        return fn()
    finally:
        ops.select("native", CPU, torch.float32)


@pytest.mark.parametrize("tokens,hidden", [(1, 256), (7, 20), (33, 4096)])
def test_rms_norm_equals_torch(native, tokens, hidden):
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden)
    x = torch.randn(tokens, hidden) * 3
    torch.testing.assert_close(norm(x), _torch_path(lambda: norm(x)), rtol=1e-5, atol=1e-5)
    residual = torch.randn(tokens, hidden)
    for a, b in zip(norm(x, residual), _torch_path(lambda: norm(x, residual)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,hidden", [(1, 256), (7, 20), (33, 4096)])
def test_bf16_rms_norm_rounds_as_torch(native, tokens, hidden):
    """bf16 in, bf16 out, rounded where transformers rounds: equal to torch's bf16 norm but where the two
    sums of squares round differently (none on the machines seen; elsewhere a row's scale may differ in
    its last fp32 bit, which moves an element by one bf16 step in about one case in 2^16)."""
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden).bfloat16()
    x, residual = (torch.randn(tokens, hidden) * 3).bfloat16(), torch.randn(tokens, hidden).bfloat16()
    ops.select("native", CPU, torch.bfloat16)
    try:
        assert ops.current().backends["rms_norm"] == "native"
        got, (got_norm, got_sum) = norm(x), norm(x, residual)
    finally:
        ops.select("native", CPU, torch.float32)
    expected, (expected_norm, expected_sum) = _torch_path(lambda: (norm(x), norm(x, residual)))
    assert got.dtype is torch.bfloat16 and got_norm.dtype is torch.bfloat16
    for a, b in ((got, expected), (got_norm, expected_norm)):
        torch.testing.assert_close(a, b)  # bf16's tolerance: one step of its 8-bit mantissa
        assert (a != b).float().mean() <= 1e-3
    torch.testing.assert_close(got_sum, expected_sum, rtol=0, atol=0)


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
    x, weight = torch.randn(2, 8).double(), torch.randn(8).double()
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-5), ops.reference.rms_norm(x, weight, 1e-5))
    x3 = torch.randn(2, 3, 8)
    torch.testing.assert_close(
        native.rms_norm(x3, weight.float(), 1e-5), ops.reference.rms_norm(x3, weight.float(), 1e-5)
    )
    table = torch.randn(8, 4).double()
    q = torch.randn(1, 2, 4).double()
    for a, b in zip(
        native.rotary(torch.tensor([1]), q, q, table, table),
        ops.reference.rotary(torch.tensor([1]), q, q, table, table),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
