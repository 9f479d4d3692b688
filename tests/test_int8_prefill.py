"""Weight-only int8 steps past the few-row kernels' caps (shards.ops.int8_gemm, shards.ops.cpu): the
dequantize kernel against Int8Weight.dequantize (bit for bit, on each build this machine can make), the
GEMM path with the kernel and with its torch fallback, the linear kernel over row tiles, and the ops'
choice between them, each against the torch reference."""

import pytest
import torch
import torch.nn.functional as F

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.kernels import dequantize, linear, moe, native
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.ops import cpu, cpu_layers, cpu_rows, int8_gemm, reference
from mixserve.shards.quant.int8_weight import Int8Weight
from tests.test_bf16_kernels import as_kernel_reads, build  # noqa: F401 - a fixture
from tests.test_decoder_layer_kernel import config, random_layer
from tests.test_int8_kernels import int8_layer

CPU = torch.device("cpu")
BF16 = torch.bfloat16
# bf16 activations and products (the reference's matmul is bf16 too): bf16's tolerances at unit scale.
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, BF16: {"rtol": 3e-2, "atol": 3e-2}}
# The ops in bf16 against the fp32 reference over the same bf16 inputs: the kernels accumulate in fp32, the
# GEMM path rounds its intermediate activations to bf16 as the bf16 reference does (outputs of size ~5).
OP_TOLERANCE = {torch.float32: TOLERANCE[torch.float32], BF16: {"rtol": 3e-2, "atol": 8e-2}}


@pytest.fixture(autouse=True)
def kernels(native):  # noqa: F811 - the conftest fixture that chooses the C kernels
    torch.manual_seed(0)
    yield
    ops.select("auto", CPU, torch.float32)


def experts(held: int, hidden: int, inter: int) -> tuple[Int8Weight, Int8Weight]:
    return (
        Int8Weight.quantize(torch.randn(held, 2 * inter, hidden) * 0.2),
        Int8Weight.quantize(torch.randn(held, hidden, inter) * 0.2),
    )


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("rows,features", [(7, 64), (5, 40), (3, 20)])
@pytest.mark.usefixtures("build")
def test_dequantize_kernel_equals_dequantize(dtype, rows, features):
    """K 64: sixteen codes a step (scalar without AVX-512), 40 and 20: scalar tails; rounding to bf16
    ties to even as torch's .to(bfloat16)."""
    weight = Int8Weight.quantize(torch.randn(rows, features) * torch.logspace(-3, 2, rows).unsqueeze(-1))
    out = torch.full((rows, features), float("nan"), dtype=dtype)
    assert dequantize.dequantize_into(weight, out) is out
    assert torch.equal(out, weight.dequantize(dtype))


def test_dequantize_kernel_refuses_wrong_buffers():
    weight = Int8Weight.quantize(torch.randn(4, 16))
    with pytest.raises(ValueError, match="codes and out"):
        dequantize.dequantize_into(weight, torch.empty(4, 15))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        dequantize.dequantize_into(weight, torch.empty(4, 16, dtype=torch.float16))


@pytest.mark.parametrize("kernel", [True, False], ids=["dequantize-kernel", "torch-dequantize"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_int8_gemm_matches_reference(kernel, dtype):
    """The GEMM path dequantizes to the reference's values, so it equals the reference up to the GEMM's
    blocking; the scratch buffer serves weights of different shapes in turn."""
    if not kernel:
        native.select("torch")
    assert dequantize.available() is kernel
    w13, w2 = experts(4, 64, 48)
    hidden = torch.randn(40, 64).to(dtype)
    weights, ids = torch.rand(40, 2), torch.randint(0, 6, (40, 2))  # ids past 4 are another rank's
    got = int8_gemm.fused_moe(hidden, w13, w2, weights, ids)
    assert got.dtype is dtype
    torch.testing.assert_close(got, reference.fused_moe(hidden, w13, w2, weights, ids), **TOLERANCE[dtype])
    weight = Int8Weight.quantize(torch.randn(300, 64))
    torch.testing.assert_close(
        int8_gemm.linear_rows(hidden, weight), reference.linear_rows(hidden, weight), **TOLERANCE[dtype]
    )


@pytest.mark.parametrize("rows", [63, 64, 65, 130])
@pytest.mark.parametrize("weight_dtype", [torch.int8, torch.float32, BF16])
@pytest.mark.usefixtures("build")
def test_linear_kernel_over_row_tiles(rows, weight_dtype):
    """Past 64 rows the kernel runs tile by tile: every tile, the last one short, against torch."""
    dense = torch.randn(36, 64)
    weight = Int8Weight.quantize(dense) if weight_dtype is torch.int8 else dense.to(weight_dtype)
    x = torch.randn(rows, 64)
    if weight_dtype is torch.int8:
        expected = F.linear(x, weight.dequantize())
    else:
        reads = as_kernel_reads(x, 64) if weight_dtype is BF16 else x
        expected = F.linear(reads, weight.float())
    torch.testing.assert_close(linear.linear_rows(x, weight), expected, rtol=1e-4, atol=1e-4)


def spy(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of module.name (still running it)."""
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("bf16_gemm", [True, False], ids=["avx512-bf16", "no-bf16-dot"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.usefixtures("build")
def test_int8_ops_past_the_caps(monkeypatch, bf16_gemm, dtype):
    """The ops at decode sizes, at the MoE kernel's cap, past it over several tiles, and a linear around
    INT8_GEMM_LINEAR_ROWS: each against the reference, through the path `cpu_rows.int8_gemm` picks (the GEMM in
    bf16 where the CPU has the bf16 dot product past the MoE kernel's cap and from INT8_GEMM_LINEAR_ROWS
    rows of a linear; past the caps where the build has no vector loop; the kernels, over tiles, otherwise)."""
    monkeypatch.setattr(cpu_rows, "bf16_gemm", lambda: bf16_gemm)
    chosen = ops.select("native", CPU, dtype)
    assert chosen.backends["fused_moe"] == chosen.backends["linear_rows"] == "native"
    vectors = moe.vector_floats() >= 8
    gemm_calls = spy(monkeypatch, int8_gemm, "fused_moe")
    kernel_calls = spy(monkeypatch, moe, "moe_experts")
    w13, w2 = experts(4, 64, 48)
    cap = moe.max_tokens()
    for tokens in (3, cap, max(cap + 1, cpu.INT8_MOE_TILE + 7)):
        gemm_calls.clear(), kernel_calls.clear()
        hidden = torch.randn(tokens, 64).to(dtype)
        weights, ids = torch.rand(tokens, 2), torch.randint(0, 4, (tokens, 2))
        got = chosen.fused_moe(hidden, w13, w2, weights, ids)
        assert got.dtype is dtype
        expected = reference.fused_moe(hidden.float(), w13, w2, weights, ids).to(dtype)
        torch.testing.assert_close(got, expected, **OP_TOLERANCE[dtype])
        past = not moe.fits(tokens)
        gemm = past and ((dtype is BF16 and bf16_gemm) or not vectors)
        assert len(gemm_calls) == int(gemm)
        tiles = -(-tokens // cpu.INT8_MOE_TILE) if past else 1
        assert len(kernel_calls) == (0 if gemm else tiles)
    linear_gemm = spy(monkeypatch, int8_gemm, "linear_rows")
    weight = Int8Weight.quantize(torch.randn(300, 64))
    for rows in (4, linear.MAX_ROWS + 1, cpu_rows.INT8_GEMM_LINEAR_ROWS - 1, cpu_rows.INT8_GEMM_LINEAR_ROWS, 200):
        linear_gemm.clear()
        x = torch.randn(rows, 64).to(dtype)
        got = chosen.linear_rows(x, weight)
        expected = reference.linear_rows(x.float(), weight).to(dtype)
        torch.testing.assert_close(got, expected, **OP_TOLERANCE[dtype])
        if dtype is BF16 and bf16_gemm:
            gemm = rows >= cpu_rows.INT8_GEMM_LINEAR_ROWS
        else:
            gemm = rows > linear.MAX_ROWS and not vectors
        assert len(linear_gemm) == int(gemm)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_decoder_layer_kernel_takes_int8_steps_up_to_its_cap(monkeypatch, dtype):
    """Int8 steps fit the decoder-layer kernel up to its token cap in bf16 (where the CPU's GEMM has the
    bf16 dot product) as in fp32, and past it they do not."""
    monkeypatch.setattr(cpu_rows, "bf16_gemm", lambda: True)
    cfg = config()
    halves = int8_layer(random_layer(cfg)).kernel_halves()
    cap = moe.max_tokens()
    cache = KVCache(1, 40, 4, cfg.num_key_value_heads, cfg.head_dim, dtype, CPU)
    for tokens in (1, cpu_rows.INT8_GEMM_LINEAR_ROWS, cap, cap + 1):
        meta = AttentionMetadata(  # one decode token per sequence, each the first of block 0
            slot_mapping=torch.zeros(tokens, dtype=torch.int64),
            num_decode_tokens=tokens,
            decode_block_tables=torch.zeros(tokens, 1, dtype=torch.int64),
            decode_context_lens=torch.ones(tokens, dtype=torch.int64),
        )
        fits = cpu_layers._step_fits(halves, tokens, dtype, cache, meta)
        assert fits is (tokens <= cap)
