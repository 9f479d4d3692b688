"""The fused RMSNorm (+ residual) and rotary + KV-write Triton kernels (shards/triton/norm.py,
rotary.py) under the interpreter against the torch layers.

Legend: T tokens, H hidden size, h query heads, kv KV heads, d head dim, N blocks, S block size.
"""

import os

import pytest
import torch

from mixserve.shards.layers.norm import RMSNorm
from mixserve.shards.layers.rotary import RotaryEmbedding
from mixserve.shards.ops.reference import write_kv

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it unless told otherwise
    pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1", allow_module_level=True)

from mixserve.shards.triton import norm, rotary  # noqa: E402 - after the interpreter check

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
EPS = 1e-5


def _norm_layer(hidden: int, dtype: torch.dtype) -> RMSNorm:
    layer = RMSNorm(hidden, EPS)
    layer.weight = torch.nn.Parameter(torch.rand(hidden, generator=torch.Generator().manual_seed(0)).to(dtype) + 0.5)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    layer = _norm_layer(48, dtype)  # H not a power of two: the row's tail is masked
    x = torch.randn(5, 48).to(dtype)
    out = norm.rms_norm(x, layer.weight.data, EPS)
    torch.testing.assert_close(out, layer(x), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(dtype):
    layer = _norm_layer(48, dtype)
    x = torch.randn(5, 96).to(dtype)[:, :48]  # rows a stride apart
    residual = torch.randn(5, 48).to(dtype)
    out, summed = norm.rms_norm(x, layer.weight.data, EPS, residual=residual)
    # Exact, but for the interpreter's fp32 -> bf16 cast, which truncates (one bf16 ulp, 2^-7 relative).
    exact = dict(atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(summed, x + residual, **exact)
    torch.testing.assert_close(out, layer(x + residual), **TOLERANCES[dtype])


def test_rms_norm_bad_arguments_raise():
    weight = torch.ones(8)
    with pytest.raises(ValueError, match="weight"):
        norm.rms_norm(torch.randn(2, 8), torch.ones(4), EPS)
    with pytest.raises(ValueError, match="dtype"):
        norm.rms_norm(torch.randn(2, 8).half(), weight, EPS)
    with pytest.raises(ValueError, match="residual"):
        norm.rms_norm(torch.randn(2, 8), weight, EPS, residual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="contiguous"):
        norm.rms_norm(torch.randn(8, 2).t(), weight, EPS)
    with pytest.raises(ValueError, match="dtype"):
        norm.rms_norm(torch.ones(2, 8, dtype=torch.int32), weight, EPS)
    assert norm.usable(torch.randn(2, 8)) and not norm.usable(torch.ones(2, 8, dtype=torch.int32))


HEADS, KV_HEADS, HEAD_DIM, BLOCKS, BLOCK_SIZE, MAX_POS = 4, 2, 16, 4, 4, 64


def _rotary_case(positions: list[int], slots: list[int], dtype: torch.dtype):
    """q, k, v as views of one qkv projection [T, (h + 2 kv) d], zeroed pools and the oracle's results."""
    tokens = len(positions)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen).to(dtype)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    q = q.view(tokens, HEADS, HEAD_DIM)  # [T, h, d], tokens a qkv row apart
    k = k.view(tokens, KV_HEADS, HEAD_DIM)  # [T, kv, d]
    v = v.view(tokens, KV_HEADS, HEAD_DIM)
    pools = [torch.zeros(BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2)]  # [N, S, kv, d]
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0)
    pos = torch.tensor(positions)
    q_ref, k_ref = rope(pos, q.clone(), k.clone())
    expected_pools = [p.clone() for p in pools]
    held = torch.tensor(slots) >= 0
    write_kv(expected_pools, torch.tensor(slots)[held], k_ref[held], v[held])
    return rope, pos, q, k, v, pools, (q_ref, k_ref, expected_pools)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_kv(dtype):
    positions = [0, 1, 5, 17, 40, MAX_POS - 1]
    slots = [3, 4, 7, 8, 15, 0]  # both sides of the block boundaries at 4 and 8, the last slot, the first
    rope, pos, q, k, v, pools, (q_ref, k_ref, expected_pools) = _rotary_case(positions, slots, dtype)
    v_before = v.clone()
    rotary.rotary_write_kv(pos, q, k, v, rope.cos, rope.sin, *pools, torch.tensor(slots))
    torch.testing.assert_close(q, q_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(k, k_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(v, v_before, atol=0, rtol=0)
    torch.testing.assert_close(pools[0], expected_pools[0], **TOLERANCES[dtype])
    torch.testing.assert_close(pools[1], expected_pools[1], atol=0, rtol=0)


def test_rotary_write_kv_single_token_and_skipped_slots():
    rope, pos, q, k, v, pools, (q_ref, k_ref, expected_pools) = _rotary_case([9, 2], [-1, 12], torch.float16)
    rotary.rotary_write_kv(pos.int(), q, k, v, rope.cos, rope.sin, *pools, torch.tensor([-1, 12], dtype=torch.int32))
    torch.testing.assert_close(q, q_ref, **TOLERANCES[torch.float16])
    torch.testing.assert_close(pools[0], expected_pools[0], **TOLERANCES[torch.float16])
    assert pools[1].flatten(0, 1)[12].any() and not pools[1].flatten(0, 1)[:12].any()  # only slot 12 written


def test_rotary_write_kv_bad_arguments_raise():
    rope, pos, q, k, v, pools, _ = _rotary_case([1, 2], [0, 1], torch.float32)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dtype|share"):
        rotary.rotary_write_kv(pos, q, k, v, rope.cos, rope.sin, pools[0].half(), pools[1], slots)
    with pytest.raises(ValueError, match="float32"):
        rotary.rotary_write_kv(pos, q, k, v, rope.cos.half(), rope.sin, *pools, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary.rotary_write_kv(pos, q, k, v, rope.cos, rope.sin, *pools, slots[:1])
    with pytest.raises(ValueError, match="contiguous"):
        rotary.rotary_write_kv(
            pos, q.transpose(1, 2).contiguous().transpose(1, 2), k, v, rope.cos, rope.sin, *pools, slots
        )
    with pytest.raises(ValueError, match="pools"):
        rotary.rotary_write_kv(pos, q, k, v, rope.cos, rope.sin, pools[0][:, :, :1], pools[1][:, :, :1], slots)
    assert rotary.usable(q) and not rotary.usable(torch.randn(2, 4, 12))  # d / 2 = 6: not a power of two
