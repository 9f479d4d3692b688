"""The decoder layer kernel (shards/kernels/decoder_layer.c) against the layers' torch forward:
a decode step's hidden output and KV writes, Mixtral's routing under tensor and expert parallelism,
the `decoder_layers` op taking it only for steps whose tokens each have a table, and its refusals."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels import decoder_layer
from mixserve.shards.layers.moe import held_expert_ids, route
from mixserve.shards.layers.rotary import RotaryEmbedding
from mixserve.shards.model import DecoderLayer, MixtralForCausalLM
from mixserve.shards.ops.cpu_layers import decoder_layer_step
from mixserve.shards.ops.reference import fused_moe

BLOCK = 4
NUM_BLOCKS = 40


@pytest.fixture(autouse=True)
def kernels(decoder_layer_kernel):
    torch.manual_seed(0)


def config(heads=8, kv_heads=4, head_dim=32, sliding_window=None, experts=8, top_k=2) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=sliding_window,
    )


def random_layer(cfg: ModelConfig) -> DecoderLayer:
    parallel = ParallelConfig()
    rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    layer = DecoderLayer(cfg, parallel, TensorParallelGroup(parallel), rotary)
    for param in layer.parameters():
        param.copy_(torch.randn_like(param) * 0.2)
    return layer


def decode_metadata(contexts: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """One decode token per sequence at the end of its context; blocks handed out shuffled."""
    blocks = torch.randperm(NUM_BLOCKS).tolist()
    tables, slots, positions = [], [], []
    for length in contexts:
        needed = -(-length // BLOCK)
        table, blocks = blocks[:needed], blocks[needed:]
        tables.append(table)
        slots.append(table[(length - 1) // BLOCK] * BLOCK + (length - 1) % BLOCK)
        positions.append(length - 1)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=len(contexts),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_context_lens=torch.tensor(contexts),
    )
    return meta, torch.tensor(positions)


def prepare(layer: DecoderLayer, hidden, positions, meta, cache) -> decoder_layer.KernelStep:
    return decoder_layer.prepare_step(hidden, positions, meta, cache, *layer.kernel_halves())


def random_cache(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_BLOCKS, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
    return torch.randn(shape), torch.randn(shape)


@pytest.mark.parametrize(
    "shape",
    [
        {},  # the demo's heads at one shard
        {"heads": 6, "kv_heads": 2, "head_dim": 16},  # six heads: the eight- and four-head blocks and a scalar tail
        {"heads": 4, "kv_heads": 4, "head_dim": 10},  # a head dim with no vectors
        {"sliding_window": 5},
        {"experts": 4, "top_k": 3},
    ],
)
@pytest.mark.parametrize("contexts", [[1], [9, 1, 17, 4, 12, 8, 30]])
def test_decode_equals_forward(shape, contexts):
    cfg = config(**shape)
    layer = random_layer(cfg)
    meta, positions = decode_metadata(contexts)
    hidden = torch.randn(len(contexts), cfg.hidden_size)
    cache = random_cache(cfg)
    torch_cache = tuple(pool.clone() for pool in cache)

    with torch.inference_mode():
        expected = layer(positions, hidden, torch_cache, meta)
        fused = hidden.clone()
        pending = decoder_layer_step(layer, prepare(layer, fused, positions, meta, cache), None, cache)
        fused += pending

    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=2e-5)
    for pool, torch_pool in zip(cache, torch_cache, strict=True):
        torch.testing.assert_close(pool, torch_pool, atol=2e-6, rtol=2e-6)


def test_pending_output_is_added_first():
    cfg = config()
    layer = random_layer(cfg)
    meta, positions = decode_metadata([5, 11])
    hidden, pending = torch.randn(2, cfg.hidden_size), torch.randn(2, cfg.hidden_size)
    cache = random_cache(cfg)
    with torch.inference_mode():
        expected = layer(positions, hidden + pending, tuple(pool.clone() for pool in cache), meta)
        fused = hidden.clone()
        fused += decoder_layer_step(layer, prepare(layer, fused, positions, meta, cache), pending, cache)
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("first_expert, held", [(0, 8), (0, 4), (4, 4), (6, 2)])
def test_moe_block_routes_as_mixtral(first_expert, held):
    """This rank's partial output of the MoE block, its experts only (expert parallelism) or all."""
    tokens, hidden_size, inter, top_k = 9, 64, 48, 2
    x = torch.randn(tokens, hidden_size)
    norm_weight = torch.rand(hidden_size) + 0.5
    gate = torch.randn(8, hidden_size)
    w13 = torch.randn(held, 2 * inter, hidden_size) * 0.1
    w2 = torch.randn(held, hidden_size, inter) * 0.1
    partial = torch.randn(tokens, hidden_size)

    x_torch = x + partial
    normed = norm_weight * x_torch * torch.rsqrt(x_torch.pow(2).mean(-1, keepdim=True) + 1e-5)
    weights, experts = route(normed, gate, top_k)
    expected = fused_moe(normed, w13, w2, weights, held_expert_ids(experts, first_expert, held))

    half = decoder_layer.MoEHalf(norm_weight, 1e-5, gate, w13, w2, top_k, first_expert)
    attention, _ = random_layer(config()).kernel_halves()  # sizes the scratch only
    meta, positions = decode_metadata([1] * tokens)
    step = decoder_layer.prepare_step(x, positions, meta, random_cache(config()), attention, half)
    decoder_layer.moe_block(step, partial, half)
    torch.testing.assert_close(x, x_torch)
    torch.testing.assert_close(step.moe_out, expected, atol=1e-5, rtol=1e-5)


def test_refuses_a_position_past_the_rotary_tables():
    cfg = config()
    layer = random_layer(cfg)
    meta, positions = decode_metadata([3])
    hidden = torch.randn(1, cfg.hidden_size)
    cache = random_cache(cfg)
    step = prepare(layer, hidden, positions + 1000, meta, cache)
    with torch.inference_mode(), pytest.raises(ValueError, match="a position past the rotary tables"):
        decoder_layer_step(layer, step, None, cache)


def test_limits_of_the_kernel():
    assert decoder_layer.fits(8, 8, 32, 16, 8)
    assert not decoder_layer.fits(8, 8, 31, 16, 8)  # rotary needs an even head dim
    assert not decoder_layer.fits(8, 65, 32, 16, 8)  # past the attention kernel's heads
    assert not decoder_layer.fits(8, 8, 32, 16, 257)
    assert not decoder_layer.fits(100_000, 8, 32, 16, 8)  # past the MoE kernel's tokens


@pytest.mark.parametrize("start,length", [(1, 6), (5, 40)])
def test_model_takes_it_for_steps_whose_tokens_each_have_a_table(demo_dir, kernel_layers, start, length):
    """Decode steps, and steps with prefill chunks that carry per-token tables, run through the
    kernel with the logits of the layers' torch forward; a step with chunks and no such tables runs
    through the layers. A chunk of 40 rows takes the kernel's prefill attention (prefill_attention.c)."""
    from mixserve.shards.kv_cache import KVCache
    from mixserve.shards.loader import load_model

    parallel = ParallelConfig()
    model: MixtralForCausalLM = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    cfg = model.config
    calls = kernel_layers

    def cache() -> KVCache:
        torch.manual_seed(1)
        kv = KVCache(
            cfg.num_hidden_layers, NUM_BLOCKS, BLOCK, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu"
        )
        for index in range(cfg.num_hidden_layers):
            for pool in kv.layer(index):
                pool.copy_(torch.randn_like(pool))
        return kv

    meta, positions = decode_metadata([6, 3])
    # positions start .. start + length - 1 of a third sequence, those before them cached
    end = start + length
    chunk_table = list(range(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - -(-end // BLOCK), -1))
    width = max(meta.decode_block_tables.shape[1], len(chunk_table))
    padded = torch.nn.functional.pad(meta.decode_block_tables, (0, width - meta.decode_block_tables.shape[1]))
    chunk_slots = [chunk_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
    mixed = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.tensor(chunk_slots)]),
        num_decode_tokens=2,
        decode_block_tables=meta.decode_block_tables,
        decode_context_lens=meta.decode_context_lens,
        prefill_query_start=torch.tensor([0, length], dtype=torch.int32),
        prefill_start_positions=torch.tensor([start], dtype=torch.int32),
        prefill_block_tables=torch.tensor([chunk_table], dtype=torch.int32),
    )
    mixed_positions = torch.cat([positions, torch.arange(start, end)])
    tokens = torch.tensor([5, 9, *range(70, 70 + length)])
    rows = torch.arange(length + 2)  # every row's logits
    with torch.inference_mode():
        model(tokens[:2], positions, cache(), meta, torch.arange(2))
        assert len(calls) == cfg.num_hidden_layers
        by_layers = model(tokens, mixed_positions, cache(), mixed, rows)
        assert len(calls) == cfg.num_hidden_layers
        mixed.token_block_tables = torch.cat([padded, torch.tensor([chunk_table] * length)])
        mixed.token_context_lens = torch.cat([meta.decode_context_lens, torch.arange(start + 1, end + 1)])
        by_kernel = model(tokens, mixed_positions, cache(), mixed, rows)
        assert len(calls) == 2 * cfg.num_hidden_layers
    torch.testing.assert_close(by_kernel, by_layers, atol=1e-4, rtol=1e-4)

    ops.select("torch", torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        model(tokens[:2], positions, cache(), meta, torch.arange(2))
        # Every op in torch (the layers above ran the C per-op kernels, prefill attention among them).
        by_torch = model(tokens, mixed_positions, cache(), mixed, rows)
    assert len(calls) == 2 * cfg.num_hidden_layers  # chosen once: torch never reaches the kernel
    torch.testing.assert_close(by_kernel, by_torch, atol=1e-4, rtol=1e-4)


def test_runner_gives_small_steps_with_prefill_chunks_per_token_tables(demo_dir):
    from mixserve.shards.loader import load_model
    from mixserve.shards.runner import ModelRunner
    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.sequence_step import SequenceStep

    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.float32, BLOCK)
    runner.allocate_cache(NUM_BLOCKS * 4)
    seen = []

    def forward(token_ids, positions, kv_cache, meta, logits_indices, gather_logits=True, greedy_stats=None):
        seen.append(meta)
        return torch.zeros(len(token_ids if logits_indices is None else logits_indices), 8)

    model.forward = forward
    greedy = SamplingParams(temperature=0.0)

    def prompt(seq_id, n, first_block):
        table = list(range(first_block, first_block + -(-n // BLOCK)))
        slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
        return SequenceStep(seq_id, list(range(1, n + 1)), 0, slots, table, True, greedy)

    runner.forward([prompt(0, 5, 0), prompt(1, 3, 10)])
    tables, lens = seen[-1].per_token()
    assert lens.tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
    assert tables.tolist() == [[0, 1]] * 5 + [[10, 0]] * 3
    runner.forward([prompt(2, decoder_layer.max_tokens() + 1, 20)])
    assert seen[-1].per_token() is None
    runner.forward([SequenceStep(0, [7], 5, [1 * BLOCK + 1], [0, 1], True, greedy)])  # a decode step: its own rows
    assert seen[-1].token_block_tables is None and seen[-1].per_token()[1].tolist() == [6]
    ops.select("torch", torch.device("cpu"), torch.float32)  # no kernel to read them: no per-token rows
    runner.forward([prompt(0, 5, 0), prompt(1, 3, 10)])
    assert seen[-1].per_token() is None
