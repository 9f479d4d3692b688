"""Every decoder layer in one C call (shards/kernels/decoder_stack.py): the same hidden states, logits and
KV writes, bit for bit, as the layers' calls one by one, in fp32 and bf16; no stack where the layers
differ in what the call takes once or a pool is shaped otherwise; a stack per KV cache. Across ranks
(its all-reduces in C) it runs in tests/test_model_parallel.py's groups, against transformers."""

from dataclasses import replace

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels import decoder_stack
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.loader import load_model
from mixserve.shards.ops import cpu_layers

BLOCK = 4
NUM_BLOCKS = 24


pytestmark = pytest.mark.usefixtures("decoder_layer_kernel")


def random_cache(cfg, dtype: torch.dtype) -> KVCache:
    torch.manual_seed(1)
    kv = KVCache(cfg.num_hidden_layers, NUM_BLOCKS, BLOCK, cfg.num_key_value_heads, cfg.head_dim, dtype, "cpu")
    for index in range(cfg.num_hidden_layers):
        for pool in kv.layer(index):
            pool.copy_(torch.randn_like(pool))
    return kv


def decode_step(contexts: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """One decode token per sequence at the end of its context, each sequence on blocks of its own."""
    tables, slots, positions, next_block = [], [], [], 0
    for length in contexts:
        needed = -(-length // BLOCK)
        tables.append(list(range(next_block, next_block + needed)))
        next_block += needed
        slots.append(tables[-1][(length - 1) // BLOCK] * BLOCK + (length - 1) % BLOCK)
        positions.append(length - 1)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=len(contexts),
        decode_block_tables=padded,
        decode_context_lens=torch.tensor(contexts),
    )
    return meta, torch.tensor(positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stack_gives_the_layers_results_bit_for_bit(demo_dir, monkeypatch, dtype):
    ops.select("auto", torch.device("cpu"), dtype)
    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel), dtype)
    cfg = model.config
    meta, positions = decode_step([7, 3, 12])
    tokens = torch.tensor([5, 9, 70])
    runs = []
    real = decoder_stack.run
    monkeypatch.setattr(decoder_stack, "run", lambda *a: runs.append(1) or real(*a))
    results = {}
    for stacked in (True, False):
        if not stacked:
            monkeypatch.setattr(cpu_layers, "_stack", lambda *a: (None, None))
        kv = random_cache(cfg, dtype)
        with torch.inference_mode():
            logits = model(tokens, positions, kv, meta, torch.arange(3))
        results[stacked] = (logits, [pool.clone() for i in range(cfg.num_hidden_layers) for pool in kv.layer(i)])
    assert runs == [1], "the decode step must take the stack, and only with it allowed"
    assert torch.equal(results[True][0], results[False][0])
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1], strict=True))


def test_no_stack_where_layers_or_pools_differ(demo_dir):
    ops.select("auto", torch.device("cpu"), torch.float32)
    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    halves = [layer.kernel_halves() for layer in model.layers]
    kv = random_cache(model.config, torch.float32)
    pools = [kv.layer(i) for i in range(len(halves))]
    assert decoder_stack.build(halves, pools) is not None
    attention, moe = halves[1]
    assert (
        decoder_stack.build([*halves[:1], (replace(attention, scale=attention.scale / 2), moe), *halves[2:]], pools)
        is None
    )
    assert decoder_stack.build([*halves[:1], (attention, replace(moe, top_k=1)), *halves[2:]], pools) is None
    short = (pools[1][0][:-1], pools[1][1][:-1])
    assert decoder_stack.build(halves, [pools[0], short, *pools[2:]]) is None
    bf16 = (pools[1][0].bfloat16(), pools[1][1].bfloat16())
    assert decoder_stack.build(halves, [pools[0], bf16, *pools[2:]]) is None


def test_a_stack_per_kv_cache_and_per_loaded_weights(demo_dir):
    ops.select("auto", torch.device("cpu"), torch.float32)
    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    layers = model.layers
    halves = [layer.kernel_halves() for layer in layers]
    stacks = decoder_stack.StackCache()
    caches = [random_cache(model.config, torch.float32) for _ in range(2)]
    for kv in caches * 2:  # the second round finds both stacks held
        stack = stacks.get(layers, kv, halves)
        assert stacks.get(layers, kv, halves) is stack
        assert [entry.k_pool for entry in stack.layers] == [kv.layer(i)[0].data_ptr() for i in range(len(layers))]
    assert stacks.get(layers, caches[0], halves) is stacks.get(layers, caches[0], halves)
    # Halves built anew (weights loaded again) make a new stack over the same cache.
    renewed = [(replace(a, norm_weight=a.norm_weight.clone()), m) for a, m in halves]
    stack = stacks.get(layers, caches[0], renewed)
    assert [entry.attn_norm for entry in stack.layers] == [a.norm_weight.data_ptr() for a, _ in renewed]
