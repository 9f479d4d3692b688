"""mixserve.shards.ops.reference, the torch paths the kernels are held to: the varlen prefill attention
against per-token decode attention, the varlen tensors the runner gives it, and the decoder layers'
residual adds fused into the next norm, bit for bit each layer's forward."""

import torch
from ops_helpers import paged_pools

from mixserve.shards import ops
from mixserve.shards.ops import reference

CPU = torch.device("cpu")


def test_prefill_reference_equals_one_decode_query_per_token():
    """Chunks at offsets (one starting at 0, one after 5 cached positions), with a sliding window."""
    k_pool, v_pool = paged_pools(blocks=8)
    q = torch.randn(7, 4, 8)
    starts, lengths, tables = [0, 5], [3, 4], [[6, 7, 0], [1, 4, 2]]
    expected = []
    for start, n, table in zip(starts, lengths, tables, strict=True):
        for p in range(start, start + n):
            token = len(expected)
            expected.append(
                reference.paged_decode_attention(
                    q[token : token + 1], (k_pool, v_pool), torch.tensor([table]), torch.tensor([p + 1]), 0.3, 4
                )
            )
    got = reference.paged_prefill_attention(
        q,
        (k_pool, v_pool),
        torch.tensor([0, 3, 7], dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(tables, dtype=torch.int32),
        0.3,
        4,
    )
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_runner_gives_prefill_chunks_as_varlen_tensors(demo_dir):
    """What a varlen prefill kernel reads: chunk starts within the prefill tokens, start positions and
    block tables, int32, after the decodes."""
    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.loader import load_model
    from mixserve.shards.runner import ModelRunner
    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.sequence_step import SequenceStep

    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), CPU, torch.float32, 4)
    runner.allocate_cache(16)
    seen = []
    model.forward = lambda *args, **kwargs: seen.append(args[3]) or torch.zeros(len(args[4]), 8)
    greedy = SamplingParams(temperature=0.0)
    chunk = SequenceStep(1, [1, 2, 3], 4, [20, 21, 22], [2, 5], True, greedy)  # positions 4-6, after a cached 0-3
    prompt = SequenceStep(2, [4, 5], 0, [36, 37], [9], True, greedy)
    decode = SequenceStep(3, [6], 2, [42], [10], True, greedy)
    runner.forward([chunk, prompt, decode])
    meta = seen[-1]
    assert meta.num_decode_tokens == 1 and meta.num_prefills == 2
    assert meta.prefill_query_start.tolist() == [0, 3, 5]
    assert meta.prefill_start_positions.tolist() == [4, 0]
    assert meta.prefill_block_tables.tolist() == [[2, 5], [9, 0]]
    assert {t.dtype for t in (meta.prefill_query_start, meta.prefill_start_positions, meta.prefill_block_tables)} == {
        torch.int32
    }


def test_decoder_layers_fuse_each_residual_add_into_the_next_norm_exactly(demo_dir):
    """The reference's layers hand (MoE output, residual) to the next layer's input norm (`rms_norm` with
    residual, one kernel where one runs): bit for bit each layer's forward, chained."""
    from mixserve.shards.attention_metadata import AttentionMetadata
    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.kv_cache import KVCache
    from mixserve.shards.loader import load_model

    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    config = model.config
    ops.select("torch", CPU, torch.float32)
    try:
        caches = [
            KVCache(config.num_hidden_layers, 4, 4, config.num_key_value_heads, config.head_dim, torch.float32, CPU)
            for _ in range(2)
        ]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([4, 5, 6]),
            prefill_query_start=torch.tensor([0, 3], dtype=torch.int32),
            prefill_start_positions=torch.tensor([0], dtype=torch.int32),
            prefill_block_tables=torch.tensor([[1]], dtype=torch.int32),
            prefill_chunks=[(3, 0)],
        )
        positions, hidden = torch.arange(3), torch.randn(3, config.hidden_size)
        fused = reference.decoder_layers(model.layers, positions, hidden, caches[0], meta)
        chained = hidden
        for index, layer in enumerate(model.layers):
            chained = layer(positions, chained, caches[1].layer(index), meta)
    finally:
        ops.select("auto", CPU, torch.float32)
    assert torch.equal(fused, chained)
