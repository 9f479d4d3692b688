"""The C kernels with bf16 weights and a bf16 KV cache: each against the torch reference on the same
bf16 numbers widened to fp32 (the kernels widen them exactly and compute in fp32, so the tolerance
is fp32's; where the build has AVX512_BF16's dot product and K is a multiple of 32, the activations
going into a bf16 weight are rounded to bf16 first, and so are the reference's), the ops against the
torch path in bf16 (bf16 tolerances), and the demo model in bf16 through the kernels against torch
bf16 (top-1 agreement on teacher-forced logits). The kernel tests run on each build this machine can
make: its own (AVX-512 with the bf16 dot product and AMX's tiles here), without the tiles, AVX-512 without
the dot product, AVX2 and plain C."""

import pytest
import torch
import torch.nn.functional as F

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels import decoder_layer, linear, moe, native, paged_attention
from mixserve.shards.model import DecoderLayer
from mixserve.shards.ops import reference
from mixserve.shards.ops.cpu_layers import decoder_layer_step
from tests.test_decoder_layer_kernel import config, decode_metadata, prepare, random_cache, random_layer

BF16 = torch.bfloat16
CPU = torch.device("cpu")
TRAINED_DEMO_STEPS = 300  # the trained demo tests/test_quantization_model.py uses: one cached checkpoint for both


# The builds: the machine's own, then the bf16 dot product without AMX's tiles, AVX-512 without the dot
# product (bf16 widened to fp32), without AVX-512 (the 8-float loops) and without AVX2 (plain C), each with
# the vector width its MoE kernel must report, whether it has the dot product and whether the tiles.
BUILDS = {
    "native": ("", 16, None, None),
    "avx512-dot": ("-mno-amx-tile", 16, 1, 0),
    "avx512-widen": ("-mno-avx512bf16", 16, 0, 0),
    "avx2": ("-mno-avx512f", 8, 0, 0),
    "plain-c": ("-mno-avx2 -mno-fma", 1, 0, 0),
}
# A bf16 weight this large runs in AMX's tiles where the build has them (rows_times_weight_amx.h: from
# 1 MiB and K 512; 2052 rows are 64 blocks of 32 rows and 4 rows the vector loop takes).
TILED = (2052, 512)


def _own_build() -> tuple[int, int, int]:
    library = native.load("moe")
    return library.moe_vector_floats(), library.moe_bf16_dot_products(), library.moe_amx_tile_products()


@pytest.fixture(autouse=True)
def kernels(native):  # noqa: F811 - the conftest fixture that chooses the C kernels
    torch.manual_seed(0)
    yield
    ops.select("auto", CPU, torch.float32)


@pytest.fixture(params=list(BUILDS))
def build(request, monkeypatch):
    """The kernels built with this parameter's flags (skipped where the machine's own build is no
    wider), for the test and then forgotten."""
    flags, *build = BUILDS[request.param]
    if flags and _own_build() <= tuple(build):
        pytest.skip("this machine's own build is that path already")
    monkeypatch.setenv("MIXSERVE_KERNEL_CFLAGS", flags)
    native.forget_loaded()
    ops.select("native", CPU, torch.float32)
    if flags:
        assert _own_build() == tuple(build)
    yield
    monkeypatch.delenv("MIXSERVE_KERNEL_CFLAGS")
    native.forget_loaded()
    ops.select("native", CPU, torch.float32)


def rounds_inputs(in_features: int) -> bool:
    """Whether the loaded build's kernels round the inputs of a bf16 weight of `in_features` inputs to
    bf16 (they take the dot product: the CPU has it and K is a multiple of 32)."""
    return bool(native.load("moe").moe_bf16_dot_products()) and in_features % 32 == 0


def as_kernel_reads(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as the loaded build's kernels meet a bf16 weight of `in_features` inputs."""
    return x.to(BF16).float() if rounds_inputs(in_features) else x


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17, 40])
@pytest.mark.parametrize("out_features,in_features", [(1030, 64), (102, 40), (7, 20), (6, 96), TILED])
def test_linear_reads_bf16_weights(build, rows, out_features, in_features):
    """K 64 and 96: the dot product's loop (the 16-float loop without it, 8 without AVX-512); 40: the
    8-float loop; 20: scalar; N tails; TILED: AMX's tiles where the build has them, one x tile as wide as x
    has rows up to 16, then tiles of 16 rows in pairs (17, 40), its last 4 weight rows the vector loop."""
    x = torch.randn(rows, in_features)
    weight = torch.randn(out_features, in_features).to(BF16)
    expected = F.linear(as_kernel_reads(x, in_features), weight.float())
    torch.testing.assert_close(linear.linear_rows(x, weight), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,out_features,in_features", [(5, 70, 256), (12, 70, 256), (40, *TILED)])
def test_the_dot_products_rows_do_not_depend_on_their_neighbours(build, rows, out_features, in_features):
    """A row's result is the same bits alone or among others (rows three, two or one at a time go through
    the same sums, 5 and 12; from 32 rows the widening loops widen each block of weights once into a
    buffer, and the fp32 loop takes the same products in the same order, 40; in AMX's tiles every row of x
    is a column of the same sums, whatever the tiles' width), so a verification step's rows equal plain
    decodes' (speculation keeps greedy outputs)."""
    x = torch.randn(rows, in_features)
    weight = torch.randn(out_features, in_features).to(BF16)
    together = linear.linear_rows(x, weight)
    for row in range(rows):
        assert torch.equal(linear.linear_rows(x[row : row + 1], weight)[0], together[row])
    assert torch.equal(linear.linear_rows(x[3:20].contiguous(), weight), together[3:20])


def test_linear_rows_op_in_bf16(build):
    chosen = ops.select("native", CPU, BF16)
    assert chosen.backends["linear_rows"] == "native"
    x, weight = torch.randn(4, 256).to(BF16), torch.randn(1000, 256).to(BF16)
    got = chosen.linear_rows(x, weight)
    assert got.dtype is BF16
    torch.testing.assert_close(got, F.linear(x, weight))


@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("hidden_size,inter", [(64, 48), (40, 20)])
def test_moe_experts_read_bf16_weights(build, tokens, hidden_size, inter):
    held, top_k = 4, 2
    hidden = torch.randn(tokens, hidden_size)
    w13 = (torch.randn(held, 2 * inter, hidden_size) * 0.2).to(BF16)
    w2 = (torch.randn(held, hidden_size, inter) * 0.2).to(BF16)
    weights = torch.rand(tokens, top_k)
    experts = torch.randint(0, held + 2, (tokens, top_k))  # ids past `held` are another rank's
    expected = reference.fused_moe(hidden, w13.float(), w2.float(), weights, experts.clamp(max=held))
    got = moe.moe_experts(hidden, w13, w2, weights, experts)
    if rounds_inputs(hidden_size):
        # the hidden rows and the activations between w13 and w2 are rounded to bf16 on the way in
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fused_moe_op_in_bf16(build):
    chosen = ops.select("native", CPU, BF16)
    hidden = torch.randn(6, 64).to(BF16)
    w13 = (torch.randn(8, 96, 64) * 0.2).to(BF16)
    w2 = (torch.randn(8, 64, 48) * 0.2).to(BF16)
    weights, experts = torch.rand(6, 2), torch.randint(0, 8, (6, 2))
    got = chosen.fused_moe(hidden, w13, w2, weights, experts)
    assert got.dtype is BF16
    torch.testing.assert_close(got, reference.fused_moe(hidden, w13, w2, weights, experts), rtol=3e-2, atol=3e-2)


def test_refuses_mixed_or_other_weight_dtypes():
    x = torch.randn(2, 16)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        linear.linear_rows(x, torch.randn(4, 16).half())
    with pytest.raises(TypeError, match="w13 and w2 must be of one type"):
        moe.moe_experts(x, torch.randn(2, 8, 16).to(BF16), torch.randn(2, 16, 4), torch.rand(2, 1), torch.zeros(2, 1))


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [
        (8, 4, 32, 16),  # the demo's shard: tiles of four tokens (two query heads a KV head)
        (8, 4, 32, 5),  # a tile, then a token alone, in every block
        (32, 8, 128, 16),  # Mixtral 8x7B: tiles of two tokens
        (16, 2, 64, 16),  # eight query heads a KV head: a token a tile
        (4, 4, 32, 16),  # one query head a KV head: a token at a time
        (2, 1, 32, 16),  # the demo's shard at world size 4: tiles, heads reduced apart
        (6, 2, 24, 5),  # three a KV head, head_dim not a multiple of 8: scalar paths
    ],
)
@pytest.mark.parametrize("window", [None, 7])
def test_paged_attention_reads_a_bf16_cache_in_place(build, heads, kv_heads, head_dim, block_size, window):
    """A bf16 cache gives the torch reference within fp32 rounding and, where the heads reduce together (a
    multiple of 4), the bits of the same values in an fp32 cache: widening is exact, and tiles of tokens keep
    each score's products and order."""
    contexts = [1, block_size + 1, 37]
    width = max(-(-n // block_size) for n in contexts)
    blocks = 3 * width * len(contexts) + 1
    pools = tuple(torch.randn(blocks, block_size, kv_heads, head_dim).to(BF16) for _ in range(2))
    tables = torch.randperm(blocks)[: width * len(contexts)].view(len(contexts), width)
    q, lens, scale = torch.randn(len(contexts), heads, head_dim), torch.tensor(contexts), head_dim**-0.5
    widened = tuple(pool.float() for pool in pools)
    expected = reference.paged_decode_attention(q, widened, tables, lens, scale, window)
    got = paged_attention.paged_decode_attention(q, pools, tables, lens, scale, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if heads % 4 == 0:
        assert torch.equal(got, paged_attention.paged_decode_attention(q, widened, tables, lens, scale, window))
    got_op = ops.select("native", CPU, BF16).paged_decode_attention(q.to(BF16), pools, tables, lens, scale, window)
    expected_bf16 = reference.paged_decode_attention(q.to(BF16), pools, tables, lens, scale, window)
    torch.testing.assert_close(got_op, expected_bf16, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [{}, {"heads": 4, "kv_heads": 4, "head_dim": 10}, {"sliding_window": 5}])
def test_decoder_layer_with_bf16_weights_and_cache(build, shape):
    """The kernel's layer over bf16 weights and pools: the fp32 forward of the same numbers widened,
    up to the new token's K/V, which the kernel stores rounded to bf16 and attends to as stored."""
    cfg = config(**shape)
    layer = bf16_layer(cfg)
    widened = random_layer(cfg)
    widened.load_state_dict({name: value.float() for name, value in layer.state_dict().items()})
    contexts = [9, 1, 17, 4]
    meta, positions = decode_metadata(contexts)
    hidden = torch.randn(len(contexts), cfg.hidden_size)
    cache = tuple(pool.to(BF16) for pool in random_cache(cfg))
    torch_cache = tuple(pool.float() for pool in cache)
    with torch.inference_mode():
        expected = widened(positions, hidden, torch_cache, meta)
        fused = hidden.clone()
        fused += decoder_layer_step(layer, prepare(layer, fused, positions, meta, cache), None, cache)
    assert layer.kernel_halves()[0].weight_type == 1
    torch.testing.assert_close(fused, expected, atol=2e-2, rtol=2e-2)
    # The new K/V are stored rounded to bf16, so exactly torch's rounded unless the kernel's K/V
    # projection met its input rounded to bf16 (the dot product), which moves some by an ulp.
    for pool, torch_pool in zip(cache, torch_cache, strict=True):
        if rounds_inputs(cfg.hidden_size):
            torch.testing.assert_close(pool.float(), torch_pool, atol=1e-2, rtol=1.6e-2)
        else:
            torch.testing.assert_close(pool, torch_pool.to(BF16), atol=0, rtol=0)


def test_decoder_layer_refuses_pools_of_another_dtype():
    cfg = config()
    layer = bf16_layer(cfg)
    meta, positions = decode_metadata([3])
    bf16_cache = tuple(pool.to(BF16) for pool in random_cache(cfg))
    step = decoder_layer.prepare_step(
        torch.randn(1, cfg.hidden_size), positions, meta, bf16_cache, *layer.kernel_halves()
    )
    with torch.inference_mode(), pytest.raises(ValueError, match="bfloat16 CPU tensor"):
        decoder_layer_step(layer, step, None, random_cache(cfg))


def bf16_layer(cfg) -> DecoderLayer:
    """A random layer whose parameters are bf16 and whose rotary tables stay fp32, as the loader
    builds a bf16 model."""
    layer = random_layer(cfg)
    for module in layer.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.to(BF16), requires_grad=False))
    return layer


def _decode_step(model, kv_cache, tokens: torch.Tensor, position: int, tables: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] after one more token of each sequence (tokens [B], all at `position`, each
    sequence in the blocks of its row of tables [B, M])."""
    block, batch = kv_cache.block_size, tokens.shape[0]
    meta = AttentionMetadata(
        slot_mapping=tables[:, position // block] * block + position % block,
        num_decode_tokens=batch,
        decode_block_tables=tables,
        decode_context_lens=torch.full((batch,), position + 1),
    )
    return model(tokens, torch.full((batch,), position), kv_cache, meta, torch.arange(batch))


def _top1_after_each(model, kv_cache, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """sequences [B, L] fed one token per step (the B sequences decoded together); from step
    prompt_len - 1 on, a sequence whose row is -1 there continues greedily. Returns the argmax after
    every token [L, B], and fills the -1 rows in place."""
    batch, length = sequences.shape
    per_sequence = -(-length // kv_cache.block_size)
    tables = torch.arange(batch * per_sequence).view(batch, per_sequence)
    top1 = []
    for position in range(length):
        top1.append(_decode_step(model, kv_cache, sequences[:, position], position, tables).argmax(-1))
        if position + 1 < length and position + 1 >= prompt_len:
            sequences[:, position + 1] = torch.where(
                sequences[:, position + 1] < 0, top1[-1], sequences[:, position + 1]
            )
    return torch.stack(top1)


def prompt_rows(tokenizer, length: int = 48) -> tuple[torch.Tensor, int, int]:
    """Four short prompts as rows [4, length] for _top1_after_each: each cut to the shortest one's tokens
    (prompt_len), -1 after them; with prompt_len and length."""
    texts = ("Once upon a time", "The little dog", "She opened the door and", "In the morning the")
    prompts = [tokenizer.encode(text) for text in texts]
    prompt_len = min(len(p) for p in prompts)
    sequences = torch.full((len(prompts), length), -1)
    for row, prompt in enumerate(prompts):
        sequences[row, :prompt_len] = torch.tensor(prompt[-prompt_len:])
    return sequences, prompt_len, length


def test_demo_model_in_bf16_through_the_kernels_agrees_with_torch_bf16(demo_tokenizer):
    """The trained demo in bf16: torch bf16 continues four prompts greedily; teacher-forced on those
    tokens, the next token the model picks through the kernels (bf16 weights and cache, fp32
    activations between the matmuls) equals torch bf16's at >= 99 % of positions (it cannot be exact: torch rounds every
    activation to bf16, the kernels do not)."""
    from mixserve.shards.demo.checkpoint import DemoConfig, ensure_demo_checkpoint
    from mixserve.shards.kv_cache import KVCache
    from mixserve.shards.loader import load_model

    parallel = ParallelConfig()
    model_dir = ensure_demo_checkpoint(DemoConfig(train_steps=TRAINED_DEMO_STEPS))
    model = load_model(model_dir, parallel, TensorParallelGroup(parallel), dtype=BF16)
    cfg = model.config
    sequences, prompt_len, length = prompt_rows(demo_tokenizer)

    def cache() -> KVCache:
        return KVCache(cfg.num_hidden_layers, 64, 16, cfg.num_key_value_heads, cfg.head_dim, BF16, CPU)

    with torch.inference_mode():
        torch_ops = ops.select("torch", CPU, BF16)
        expected = _top1_after_each(model, cache(), sequences, prompt_len)
        chosen = ops.select("native", CPU, BF16)
        got = _top1_after_each(model, cache(), sequences.clone(), length)
    assert torch_ops.backends["decoder_layers"] == "torch"
    assert chosen.backends["decoder_layers"] == "native" and chosen.backends["linear_rows"] == "native"
    agreement = (got == expected).float().mean().item()
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
