"""bitsandbytes' quantized layers (`--quantize`): the modes' settings, quantized linears close to fp32
and small, 4-bit lookup tables shared, LLM.int8's outlier columns and activations past fp16's range,
the 4-bit fused and dequantize paths, and the sparse quantized MoE running only the routed experts."""

import pytest
import torch
import torch.nn.functional as F

from child_processes import fresh_interpreter
from mixserve.shards.layers.moe import route
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.experts import QuantizedExperts
from mixserve.shards.quant.linear import Linear4bit, Linear8bitLt, quantize_linear

FOUR_BIT = ["bitsandbytes-nf4", "bitsandbytes-fp4"]
CPU = torch.device("cpu")


def test_unknown_mode_and_bad_settings_say_why():
    with pytest.raises(ValueError, match="bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4"):
        QuantizationConfig("bitsandbytes-int3")
    with pytest.raises(ValueError, match="threshold"):
        QuantizationConfig("bitsandbytes", threshold=-1.0)
    with pytest.raises(ValueError, match="blocksize"):
        QuantizationConfig("bitsandbytes-nf4", blocksize=48)


@pytest.mark.parametrize(
    "mode, cls, max_error, max_bytes_per_weight",
    [
        ("bitsandbytes", Linear8bitLt, 0.02, 1.05),  # int8 + one fp32 scale per row of 128
        # 4 bits + an 8-bit scale per 64, + the code maps (1.1 KB a weight, a lot only for one this small)
        ("bitsandbytes-nf4", Linear4bit, 0.12, 0.56),
        ("bitsandbytes-fp4", Linear4bit, 0.15, 0.56),
    ],
)
def test_quantized_linear_is_close_and_small(mode, cls, max_error, max_bytes_per_weight):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 128, generator=generator)  # [N, K]
    x = torch.randn(5, 128, generator=generator)  # [T, K]
    layer = quantize_linear(weight, QuantizationConfig(mode), torch.float32, CPU)
    assert isinstance(layer, cls)
    with torch.inference_mode():
        y = layer(x)
    expected = x @ weight.T
    assert y.shape == expected.shape and y.dtype == torch.float32
    assert float((y - expected).norm() / expected.norm()) < max_error
    assert layer.nbytes / weight.numel() <= max_bytes_per_weight
    if cls is Linear4bit:
        # On the CPU bitsandbytes runs 4-bit as dequantize + fp32 matmul: bit for bit the dequantized weight.
        torch.testing.assert_close(y, F.linear(x, layer.dequantize()), atol=0, rtol=0)


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_four_bit_weights_share_their_lookup_tables(mode):
    first, second = (
        quantize_linear(torch.randn(n, 64), QuantizationConfig(mode), torch.float32, CPU) for n in (32, 96)
    )
    assert first.quant_state.code is second.quant_state.code
    assert first.quant_state.state2.code is second.quant_state.state2.code
    held = {t.data_ptr() for t in first.tensors()}
    assert first.quant_state.code.data_ptr() not in held, "a shared table is counted as the weight's own bytes"


def test_llm_int8_keeps_outlier_columns_in_floating_point():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 128, generator=generator)
    x = torch.randn(6, 128, generator=generator)
    x[:, 17] = 40.0  # one outlier feature, as large models grow them: it would flatten every row's int8 scale
    expected = x @ weight.T
    errors = {}
    for threshold in (0.0, 6.0):
        layer = quantize_linear(weight, QuantizationConfig("bitsandbytes", threshold=threshold), torch.float32, CPU)
        with torch.inference_mode():
            errors[threshold] = float((layer(x) - expected).norm() / expected.norm())
    assert errors[6.0] < 0.02
    assert errors[6.0] < errors[0.0] / 3, errors


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llm_int8_takes_activations_past_the_fp16_range(threshold, dtype):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(64, 128, generator=generator)
    x = torch.randn(4, 128, generator=generator).to(dtype)
    x[:, :8] *= 3e5  # past fp16's 65504: cast to fp16 they were inf, and every output nan
    layer = quantize_linear(weight, QuantizationConfig("bitsandbytes", threshold=threshold), dtype, CPU)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    expected = x.float() @ weight.T
    assert float((y.float() - expected).norm() / expected.norm()) < 0.03


@pytest.mark.parametrize("mode", FOUR_BIT)
@pytest.mark.parametrize("rows", [1, 7])
def test_four_bit_fused_and_dequantize_paths_agree(mode, rows):
    generator = torch.Generator().manual_seed(rows)
    layer = quantize_linear(torch.randn(96, 128, generator=generator), QuantizationConfig(mode), torch.float32, CPU)
    x = torch.randn(rows, 128, generator=generator)  # [T, K]
    with torch.inference_mode():
        fused, dequantized = layer(x, path="fused"), layer(x, path="dequantize")
    torch.testing.assert_close(fused, dequantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dequantized, F.linear(x, layer.dequantize()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="is not fused or dequantize"):
        layer(x, path="gemv")


def dense_oracle(hidden, w13, w2, weights, experts):
    """Every expert on every token with plain fp32 weights, weighted by its routing weight (0 if not chosen)."""
    out = torch.zeros_like(hidden)
    for e in range(len(w13)):
        gate, up = F.linear(hidden, w13[e]).chunk(2, dim=-1)
        out += F.linear(F.silu(gate) * up, w2[e]) * (weights * (experts == e)).sum(dim=-1, keepdim=True)
    return out


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_quantized_experts_run_only_the_routed_experts(tokens):
    num_experts, hidden_size, inter, top_k = 8, 64, 96, 2
    generator = torch.Generator().manual_seed(tokens)
    config = QuantizationConfig("bitsandbytes-nf4")

    def quantized(*shape):
        return quantize_linear(torch.randn(*shape, generator=generator) * 0.1, config, torch.float32, CPU)

    moe = QuantizedExperts(
        [quantized(2 * inter, hidden_size) for _ in range(num_experts)],
        [quantized(hidden_size, inter) for _ in range(num_experts)],
    )
    ran: list[int] = []
    for e, layer in enumerate(moe.w13):
        layer.register_forward_hook(lambda *_, e=e: ran.append(e))
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    weights, experts = route(hidden, torch.randn(num_experts, hidden_size, generator=generator), top_k)
    with torch.inference_mode():
        out = moe(hidden, weights, experts)
    assert sorted(ran) == sorted(set(experts.flatten().tolist())), "an expert without tokens ran"
    w13 = [layer.dequantize() for layer in moe.w13]
    w2 = [layer.dequantize() for layer in moe.w2]
    torch.testing.assert_close(out, dense_oracle(hidden, w13, w2, weights, experts), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bitsandbytes_imports_without_torch_s_compiler_and_its_4_bit_layers_run_so():
    """bitsandbytes wraps functions in torch.compile at import, whose first call imports inductor's compiler
    (~2 s); a shard imports it with compile as the identity, and restores compile after."""
    probe = (
        "import sys, torch\n"
        "from mixserve.shards.quant.config import QuantizationConfig\n"
        "from mixserve.shards.quant.linear import load_bitsandbytes, quantize_linear\n"
        "compile_ = torch.compile\n"
        "load_bitsandbytes()\n"
        "assert torch.compile is compile_\n"
        "weight, x = torch.randn(64, 128), torch.randn(2, 128)\n"
        "layer = quantize_linear(weight, QuantizationConfig('bitsandbytes-nf4'), torch.float32, torch.device('cpu'))\n"
        "assert (layer(x) - x @ weight.T).norm() < 0.3 * (x @ weight.T).norm()\n"
        "print('torch._inductor.compile_fx' in sys.modules)\n"
    )
    assert fresh_interpreter(probe) == "False"
