"""Weight-only int8 (`--quantize int8-wo`): the quantization round trip, each C kernel reading int8
codes in place against the torch reference over the same codes dequantized to fp32 (the kernels
widen the codes exactly and scale each row's fp32 dot product, so the tolerance is fp32's), the ops'
torch fallback (dequantize on the fly), and the demo model loaded in int8 through the kernels
against the same int8 model through the torch reference. The kernel tests run on each build this
machine can make: its own (AVX-512 here), AVX2 and plain C (tests/test_bf16_kernels.py's `build`)."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels import linear, moe, native
from mixserve.shards.model import DecoderLayer
from mixserve.shards.ops import reference
from mixserve.shards.ops.cpu_layers import decoder_layer_step
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.int8_layers import Int8Experts, Int8Linear
from mixserve.shards.quant.int8_weight import Int8Weight
from tests.test_bf16_kernels import (  # noqa: F401
    TRAINED_DEMO_STEPS,
    _top1_after_each,
    as_kernel_reads,
    build,
    prompt_rows,
)
from tests.test_decoder_layer_kernel import config, decode_metadata, prepare, random_cache, random_layer

CPU = torch.device("cpu")
INT8_WO = QuantizationConfig("int8-wo")


def int8_kernel_reads(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as the loaded build's kernels meet a bf16 model's int8 codes of `in_features` inputs: each row
    quantized to 15 bits with a step of max |x| / 16383 (rows_to_i16.h) where the build's int16 dot product
    (VNNI's, or AVX2's multiply-add) takes K, else as bf16 weights meet it."""
    if not native.load("moe").moe_int8_int16_takes(ctypes.c_int64(in_features)):
        return as_kernel_reads(x, in_features)
    largest = x.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, (16383.0 / largest.double()).float(), torch.zeros_like(largest))
    return (torch.round(x * inverse).double() * (largest.double() / 16383)).float()


@pytest.fixture(autouse=True)
def kernels(native):  # noqa: F811 - the conftest fixture that chooses the C kernels
    torch.manual_seed(0)
    yield
    ops.select("auto", CPU, torch.float32)


def test_quantization_round_trip():
    """Per-row absmax / 127: each row's largest magnitude is code +-127, every value within half a step
    of its dequantized value, a zero row stays zero, and quantizing the dequantized weight again gives
    the same codes."""
    weight = torch.randn(2, 6, 40) * torch.logspace(-3, 2, 6).unsqueeze(-1)  # rows of very different scales
    weight[1, 2] = 0.0
    q = Int8Weight.quantize(weight)
    assert q.codes.dtype is torch.int8 and q.scale.dtype is torch.float32
    assert q.shape == weight.shape and q.scale.shape == (2, 6)
    torch.testing.assert_close(q.scale, weight.abs().amax(-1) / 127)
    nonzero = q.scale > 0
    assert (q.codes.abs().amax(-1)[nonzero] == 127).all()
    assert (q.codes[1, 2] == 0).all() and q.scale[1, 2] == 0
    error = (q.dequantize() - weight).abs()
    assert (error <= q.scale.unsqueeze(-1) * 0.5 * (1 + 1e-5)).all()
    again = Int8Weight.quantize(q.dequantize())
    assert torch.equal(again.codes, q.codes)
    torch.testing.assert_close(again.scale, q.scale)
    assert q.dequantize(torch.bfloat16).dtype is torch.bfloat16
    assert q.nbytes == 2 * 6 * 40 + 2 * 6 * 4
    assert torch.equal(q[1].codes, q.codes[1])


def test_int8_weight_refuses_mismatched_parts():
    with pytest.raises(TypeError, match="codes must be int8"):
        Int8Weight(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="one value per row"):
        Int8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(8))


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 40])
@pytest.mark.parametrize("out_features,in_features", [(1030, 64), (102, 40), (7, 20)])
@pytest.mark.usefixtures("build")
def test_linear_reads_int8_weights(rows, out_features, in_features):
    """K 64: the 16-float loop (8 without AVX-512); 40: the 8-float loop; 20: scalar; N tails; 40 rows: the
    codes widened once a block into a buffer for the fp32 loop."""
    x = torch.randn(rows, in_features)
    weight = Int8Weight.quantize(torch.randn(out_features, in_features))
    expected = F.linear(x, weight.dequantize())
    torch.testing.assert_close(linear.linear_rows(x, weight), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17, 33])
@pytest.mark.parametrize("out_features,in_features", [(1030, 64), (70, 96), (6, 256), (102, 40)])
@pytest.mark.usefixtures("build")
def test_a_bf16_models_int8_weights_meet_bf16_activations(rows, out_features, in_features):
    """A bf16 model's int8 codes meet x rounded to bf16 in the bf16 dot product where the build has it and K
    is a multiple of 32, as its bf16 weights do (codes made bf16 in registers below 3 rows, in a buffer
    once per block from 3); x stays fp32 elsewhere and in an fp32 model. Products of bf16 values are
    exact in fp32, so the tolerance is fp32's."""
    x = torch.randn(rows, in_features)
    weight = Int8Weight.quantize(torch.randn(out_features, in_features))
    native.set_int8_bf16_activations(True)
    try:
        got = linear.linear_rows(x, weight)
    finally:
        native.set_int8_bf16_activations(False)
    expected = F.linear(int8_kernel_reads(x, in_features), weight.dequantize())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    fp32_model = linear.linear_rows(x, weight)
    torch.testing.assert_close(fp32_model, F.linear(x, weight.dequantize()), rtol=1e-4, atol=1e-4)


def test_selecting_a_models_ops_says_whether_its_int8_weights_meet_bf16_activations():
    x = torch.randn(5, 128)
    weight = Int8Weight.quantize(torch.randn(40, 128))
    for dtype, reads in ((torch.bfloat16, int8_kernel_reads(x, 128)), (torch.float32, x)):
        ops.select("native", CPU, dtype)
        expected = F.linear(reads, weight.dequantize())
        torch.testing.assert_close(linear.linear_rows(x, weight), expected, rtol=1e-5, atol=1e-5, msg=str(dtype))


@pytest.mark.usefixtures("build")
def test_a_bf16_models_int8_rows_do_not_depend_on_their_neighbours():
    """A row's result is the same bits alone or among others, across the in-register (1-2 rows) and the
    buffered (3 or more) paths, so a verification step's rows equal plain decodes' (speculation keeps
    greedy outputs)."""
    x = torch.randn(7, 256)
    weight = Int8Weight.quantize(torch.randn(70, 256))
    native.set_int8_bf16_activations(True)
    try:
        together = linear.linear_rows(x, weight)
        for row in range(7):
            assert torch.equal(linear.linear_rows(x[row : row + 1], weight)[0], together[row])
            assert torch.equal(linear.linear_rows(x[row : row + 2], weight), together[row : row + 2])
    finally:
        native.set_int8_bf16_activations(False)


@pytest.mark.usefixtures("build")
def test_the_int16_dot_products_hold_the_largest_sums_they_take():
    """At the largest K the build's int16 dot product takes (8192 with AVX2's multiply-add, 16384 with
    VNNI's), every product at its largest (x at 16383 steps, codes at 127, all of one sign) sums exactly:
    an int32 lane that overflowed would not give K."""
    takes = native.load("moe").moe_int8_int16_takes
    largest = [k for k in (8192, 16384) if takes(ctypes.c_int64(k))]
    if not largest:
        pytest.skip("this build has no int16 dot product")
    K = largest[-1]
    assert not takes(ctypes.c_int64(2 * K)) and not takes(ctypes.c_int64(K + 8))
    weight = Int8Weight.quantize(torch.ones(8, K))
    x = torch.tensor([[1.0] * K, [-1.0] * K, [0.5] * K])
    native.set_int8_bf16_activations(True)
    try:
        got = linear.linear_rows(x, weight)
    finally:
        native.set_int8_bf16_activations(False)
    expected = torch.tensor([[K], [-K], [K / 2]], dtype=torch.float32).expand(3, 8)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.usefixtures("build")
def test_an_fp32_models_int8_rows_do_not_depend_on_their_neighbours():
    """A row's result is the same bits alone or among others where the codes meet fp32 x, though from 32 rows
    the widening loops widen each block of codes once into a buffer: the fp32 loop then takes the same
    products in the same order."""
    x = torch.randn(40, 256)
    weight = Int8Weight.quantize(torch.randn(70, 256))
    together = linear.linear_rows(x, weight)
    for row in range(40):
        assert torch.equal(linear.linear_rows(x[row : row + 1], weight)[0], together[row])
    assert torch.equal(linear.linear_rows(x[3:37].contiguous(), weight), together[3:37])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("build")
def test_linear_rows_op_with_int8_weights(dtype):
    """The op: the kernel up to linear.MAX_ROWS rows, the reference's dequantizing matmul past them (in
    bf16, a bf16 matmul: bf16 tolerances)."""
    chosen = ops.select("native", CPU, dtype)
    assert chosen.backends["linear_rows"] == "native"
    weight = Int8Weight.quantize(torch.randn(300, 128) * 0.1)
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if dtype is torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    for rows in (4, linear.MAX_ROWS + 1):
        x = torch.randn(rows, 128).to(dtype)
        got = chosen.linear_rows(x, weight)
        assert got.dtype is dtype
        torch.testing.assert_close(got, F.linear(x.float(), weight.dequantize()).to(dtype), **tolerance)


@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("hidden_size,inter", [(64, 48), (40, 20)])
@pytest.mark.usefixtures("build")
def test_moe_experts_read_int8_weights(tokens, hidden_size, inter):
    held, top_k = 4, 2
    hidden = torch.randn(tokens, hidden_size)
    w13 = Int8Weight.quantize(torch.randn(held, 2 * inter, hidden_size) * 0.2)
    w2 = Int8Weight.quantize(torch.randn(held, hidden_size, inter) * 0.2)
    weights = torch.rand(tokens, top_k)
    experts = torch.randint(0, held + 2, (tokens, top_k))  # ids past `held` are another rank's
    expected = reference.fused_moe(hidden, w13.dequantize(), w2.dequantize(), weights, experts.clamp(max=held))
    got = moe.moe_experts(hidden, w13, w2, weights, experts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The reference itself takes the int8 weights, dequantizing one expert at a time.
    torch.testing.assert_close(reference.fused_moe(hidden, w13, w2, weights, experts), got, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("build")
def test_fused_moe_op_with_int8_weights():
    chosen = ops.select("native", CPU, torch.float32)
    assert chosen.backends["fused_moe"] == "native"
    hidden = torch.randn(6, 64)
    w13 = Int8Weight.quantize(torch.randn(8, 96, 64) * 0.2)
    w2 = Int8Weight.quantize(torch.randn(8, 64, 48) * 0.2)
    weights, experts = torch.rand(6, 2), torch.randint(0, 8, (6, 2))
    got = chosen.fused_moe(hidden, w13, w2, weights, experts)
    expected = reference.fused_moe(hidden, w13.dequantize(), w2.dequantize(), weights, experts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_kernels_refuse_mixed_weight_types():
    x = torch.randn(2, 16)
    w13 = Int8Weight.quantize(torch.randn(2, 8, 16))
    with pytest.raises(TypeError, match="w13 and w2 must be of one type"):
        moe.moe_experts(x, w13, torch.randn(2, 16, 4), torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="weight codes must be contiguous"):
        linear.linear_rows(x, Int8Weight(w13.codes[0].t().contiguous().t(), w13.scale[0]))


def int8_layer(layer: DecoderLayer) -> DecoderLayer:
    """`layer` as int8-wo loads it: q/k/v, o and the experts quantized per row, the gate and norms kept."""
    attn, experts = layer.self_attn, layer.block_sparse_moe
    for projection in (attn.qkv_proj, attn.o_proj):
        projection.quantized = Int8Linear(Int8Weight.quantize(projection.weight))
        projection.weight = None
    experts.quantized = Int8Experts(Int8Weight.quantize(experts.w13), Int8Weight.quantize(experts.w2))
    experts.w13 = experts.w2 = None
    layer._kernel_halves_read = False
    return layer


def dequantized_copy(cfg, layer: DecoderLayer) -> DecoderLayer:
    """An fp32 layer holding int8 `layer`'s weights dequantized: the torch math the kernel must match."""
    attn, experts = layer.self_attn, layer.block_sparse_moe
    dense = random_layer(cfg)
    state = {name: value for name, value in layer.state_dict().items() if not name.startswith("self_attn.")}
    state |= {
        "self_attn.qkv_proj.weight": attn.qkv_proj.quantized.dequantize(),
        "self_attn.o_proj.weight": attn.o_proj.quantized.dequantize(),
        "block_sparse_moe.w13": experts.quantized.w13.dequantize(),
        "block_sparse_moe.w2": experts.quantized.w2.dequantize(),
    }
    dense.load_state_dict(state, strict=False)
    return dense


@pytest.mark.parametrize("shape", [{}, {"heads": 4, "kv_heads": 4, "head_dim": 10}, {"sliding_window": 5}])
@pytest.mark.usefixtures("build")
def test_decoder_layer_with_int8_weights(shape):
    """The kernel's layer over int8 projections and experts: the fp32 forward over the same codes
    dequantized; the same int8 layer through the torch reference ops agrees too."""
    cfg = config(**shape)
    layer = int8_layer(random_layer(cfg))
    dense = dequantized_copy(cfg, layer)
    contexts = [9, 1, 17, 4]
    meta, positions = decode_metadata(contexts)
    hidden = torch.randn(len(contexts), cfg.hidden_size)
    cache = random_cache(cfg)
    torch_cache = tuple(pool.clone() for pool in cache)
    reference_cache = tuple(pool.clone() for pool in cache)
    with torch.inference_mode():
        expected = dense(positions, hidden, torch_cache, meta)
        fused = hidden.clone()
        fused += decoder_layer_step(layer, prepare(layer, fused, positions, meta, cache), None, cache)
        ops.select("torch", CPU, torch.float32)
        through_reference = layer(positions, hidden, reference_cache, meta)
    attention, experts = layer.kernel_halves()
    assert attention.weight_type == 2 and experts.weight_type == 2 and experts.gate_type == 0
    torch.testing.assert_close(fused, expected, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(through_reference, expected, atol=5e-5, rtol=5e-5)
    for pool, torch_pool in zip(cache, torch_cache, strict=True):
        torch.testing.assert_close(pool, torch_pool, atol=2e-6, rtol=2e-6)


def load_int8_demo(dtype: torch.dtype = torch.float32, quantization: QuantizationConfig | None = INT8_WO):
    """The trained demo (tests/test_bf16_kernels.py's) loaded on one rank, in int8-wo unless told."""
    from mixserve.shards.demo.checkpoint import DemoConfig, ensure_demo_checkpoint
    from mixserve.shards.loader import load_model

    parallel = ParallelConfig()
    model_dir = ensure_demo_checkpoint(DemoConfig(train_steps=TRAINED_DEMO_STEPS))
    return load_model(model_dir, parallel, TensorParallelGroup(parallel), dtype=dtype, quantization=quantization)


def teacher_forced_top1(
    model, sequences: torch.Tensor, prompt_len: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """tests/test_bf16_kernels.py's _top1_after_each with a fresh KV cache in `dtype`: [L, B]."""
    from mixserve.shards.kv_cache import KVCache

    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 64, 16, cfg.num_key_value_heads, cfg.head_dim, dtype, CPU)
    return _top1_after_each(model, cache, sequences, prompt_len)


def test_demo_model_in_int8_through_the_kernels_agrees_with_its_torch_reference(demo_tokenizer):
    """The trained demo loaded in int8-wo (every linear weight int8, LM head included): its torch
    reference (dequantize-on-the-fly matmuls) continues four prompts greedily; teacher-forced on those
    tokens, the kernels (int8 read in place, fp32 math) pick the same next token at every position
    but, at most, near-ties (>= 99 %). And the quantization costs little: the int8 model's picks
    agree with the fp32 model's on the same tokens at >= 97 % of positions (99 % here)."""
    model = load_int8_demo()
    assert model.lm_head.weight is None and isinstance(model.lm_head.quantized, Int8Linear)
    assert isinstance(model.layers[0].block_sparse_moe.quantized, Int8Experts)
    sequences, prompt_len, length = prompt_rows(demo_tokenizer)
    with torch.inference_mode():
        ops.select("torch", CPU, torch.float32)
        expected = teacher_forced_top1(model, sequences, prompt_len)
        chosen = ops.select("native", CPU, torch.float32)
        got = teacher_forced_top1(model, sequences.clone(), length)
        fp32 = teacher_forced_top1(load_int8_demo(quantization=None), sequences.clone(), length)
    assert chosen.backends["decoder_layers"] == "native" and chosen.backends["linear_rows"] == "native"
    agreement = (got == expected).float().mean().item()
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
    against_fp32 = (got == fp32).float().mean().item()
    assert against_fp32 >= 0.97, f"int8 and fp32 agree at {against_fp32:.3f} of positions"


def test_demo_model_in_int8_and_bf16_through_the_kernels_agrees_with_its_torch_reference(demo_tokenizer):
    """The same in a bf16 model, where the kernels meet the int8 codes with each row of x quantized to 15
    bits in an int16 dot product where the build has one (VNNI's, or AVX2's multiply-add: rows_to_i16.h),
    else rounded to bf16 or widened, and the torch reference multiplies the codes dequantized to bf16: the
    kernels' picks equal the reference's at >= 99 % of positions, and the bf16 model's at >= 97 %."""
    bf16 = torch.bfloat16
    model = load_int8_demo(bf16)
    sequences, prompt_len, length = prompt_rows(demo_tokenizer)
    with torch.inference_mode():
        ops.select("torch", CPU, bf16)
        expected = teacher_forced_top1(model, sequences, prompt_len, bf16)
        chosen = ops.select("native", CPU, bf16)
        got = teacher_forced_top1(model, sequences.clone(), length, bf16)
        plain = teacher_forced_top1(load_int8_demo(bf16, quantization=None), sequences.clone(), length, bf16)
    assert chosen.backends["decoder_layers"] == "native" and chosen.backends["linear_rows"] == "native"
    agreement = (got == expected).float().mean().item()
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
    against_bf16 = (got == plain).float().mean().item()
    assert against_bf16 >= 0.97, f"int8 and bf16 agree at {against_bf16:.3f} of positions"
