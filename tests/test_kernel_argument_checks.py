"""The C kernel wrappers (mixserve.shards.kernels) refusing wrong arguments (dtypes, layouts, shapes,
ids outside the pools) before any pointer reaches C."""

import pytest
import torch
from ops_helpers import paged_pools

from mixserve.shards.kernels import decoder_layer, elementwise, linear, moe, paged_attention, sampling


def test_decode_attention_refuses_wrong_arguments(native):
    cache = paged_pools()
    q, tables, lens = torch.randn(2, 4, 8), torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 3])
    call = paged_attention.paged_decode_attention
    with pytest.raises(TypeError, match="q must be torch.float32"):
        call(q.double(), cache, tables, lens, 0.3, None)
    with pytest.raises(ValueError, match="q must be contiguous"):
        call(torch.randn(4, 2, 8).transpose(0, 1), cache, tables, lens, 0.3, None)
    with pytest.raises(ValueError, match="head dims of q and the pools"):
        call(torch.randn(2, 4, 6), cache, tables, lens, 0.3, None)
    with pytest.raises(ValueError, match="k_pool .* and v_pool .* must have one shape"):
        call(q, (cache[0], cache[1][:3]), tables, lens, 0.3, None)
    with pytest.raises(TypeError, match="block_tables must be an int32 or int64"):
        call(q, cache, tables.float(), lens, 0.3, None)
    with pytest.raises(ValueError, match="rows of block_tables"):
        call(q, cache, tables[:1], lens, 0.3, None)
    with pytest.raises(ValueError, match="past its block-table row"):
        call(q, cache, tables, torch.tensor([9, 3]), 0.3, None)  # 9 positions, a row of 2 blocks of 4
    with pytest.raises(ValueError, match="a block id outside the pools"):
        call(q, cache, torch.tensor([[0, 6], [2, 3]]), lens, 0.3, None)
    with pytest.raises(ValueError, match="query heads 3 must be a multiple"):
        call(torch.randn(2, 3, 8), cache, tables, lens, 0.3, None)


def test_moe_kernel_refuses_wrong_arguments(native):
    hidden, w13, w2 = torch.randn(3, 16), torch.randn(4, 12, 16), torch.randn(4, 16, 6)
    weights, experts = torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [1, 2]])
    call = moe.moe_experts
    with pytest.raises(TypeError, match="w13 must be float32 or bfloat16"):
        call(hidden, w13.half(), w2, weights, experts)
    with pytest.raises(ValueError, match="hidden must be contiguous"):
        call(torch.randn(16, 3).t(), w13, w2, weights, experts)
    with pytest.raises(ValueError, match="hidden sizes of hidden, w13 and w2"):
        call(hidden, w13, torch.randn(4, 15, 6), weights, experts)
    with pytest.raises(ValueError, match="intermediate sizes"):
        call(hidden, w13, torch.randn(4, 16, 5), weights, experts)
    with pytest.raises(ValueError, match="tokens of hidden, weights and experts"):
        call(hidden, w13, w2, weights[:2], experts)
    with pytest.raises(TypeError, match="experts must be an int32 or int64"):
        call(hidden, w13, w2, weights, experts.float())
    with pytest.raises(ValueError, match="negative expert ids"):
        call(hidden, w13, w2, weights, -experts)


def test_elementwise_kernels_refuse_wrong_arguments(native):
    with pytest.raises(TypeError, match="x must be torch.float32"):
        elementwise.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="hidden sizes of x and weight"):
        elementwise.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        elementwise.rms_norm(torch.randn(2, 3, 8), torch.randn(8), 1e-5)
    with pytest.raises(TypeError, match="weight must be torch.bfloat16"):
        elementwise.rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(8), 1e-5)
    table, x = torch.randn(8, 4), torch.randn(1, 2, 4)
    with pytest.raises(TypeError, match="positions must be torch.int64"):
        elementwise.rotary(torch.tensor([1], dtype=torch.int32), x, table, table)
    with pytest.raises(ValueError, match="each token's heads contiguously"):
        elementwise.rotary(torch.tensor([1, 2]), torch.randn(2, 4, 2).transpose(1, 2), table, table)
    with pytest.raises(ValueError, match="cos .* and sin .* must have one shape"):
        elementwise.rotary(torch.tensor([1]), x, table, table[:4])
    with pytest.raises(ValueError, match="position past 8"):
        elementwise.rotary(torch.tensor([8]), x, table, table)


def test_linear_and_sampling_kernels_refuse_wrong_arguments(native):
    with pytest.raises(ValueError, match="input features of x and weight"):
        linear.linear_rows(torch.randn(2, 8), torch.randn(16, 9))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        linear.linear_rows(torch.randn(2, 8), torch.randn(8, 16).t())
    with pytest.raises(ValueError, match="logits must be contiguous"):
        sampling.row_argmax_logsumexp(torch.randn(10, 2).t())
    with pytest.raises(ValueError, match="at least one column"):
        sampling.row_argmax_logsumexp(torch.randn(2, 0))
    with pytest.raises(TypeError, match="logits must be torch.float32"):
        sampling.slice_greedy_stats(torch.randn(2, 10).double(), 0)
    with pytest.raises(ValueError, match=r"every must be \[R, N, 3\]"):
        sampling.combine_greedy(torch.randn(2, 2, 4).double())


def test_decoder_layer_kernel_refuses_wrong_arguments(native):
    from mixserve.shards.attention_metadata import AttentionMetadata

    heads, kv_heads, head_dim, hidden_size = 4, 2, 8, 16
    attention = decoder_layer.AttentionHalf(
        torch.rand(hidden_size),
        1e-5,
        torch.randn((heads + 2 * kv_heads) * head_dim, hidden_size),
        torch.randn(hidden_size, heads * head_dim),
        torch.randn(32, head_dim),
        torch.randn(32, head_dim),
        heads,
        0.3,
        None,
    )
    experts = decoder_layer.MoEHalf(
        torch.rand(hidden_size), 1e-5, torch.randn(4, hidden_size), torch.randn(4, 12, 16), torch.randn(4, 16, 6), 2, 0
    )
    with pytest.raises(TypeError, match="w_qkv must be float32 or bfloat16"):
        decoder_layer.AttentionHalf(
            attention.norm_weight,
            1e-5,
            attention.w_qkv.double(),
            attention.w_o,
            attention.cos,
            attention.sin,
            4,
            0.3,
            None,
        )
    with pytest.raises(ValueError, match="experts held in w13 and w2"):
        decoder_layer.MoEHalf(experts.norm_weight, 1e-5, experts.gate, experts.w13, experts.w2[:3], 2, 0)
    cache = paged_pools()
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([4, 9]),
        num_decode_tokens=2,
        decode_block_tables=torch.tensor([[1, 0], [2, 0]]),
        decode_context_lens=torch.tensor([1, 2]),
    )
    positions, hidden = torch.tensor([0, 1]), torch.randn(2, hidden_size)
    with pytest.raises(ValueError, match="tokens of hidden and positions"):
        decoder_layer.prepare_step(hidden, positions[:1], meta, cache, attention, experts)
    with pytest.raises(ValueError, match="hidden sizes of hidden and the weights"):
        decoder_layer.prepare_step(torch.randn(2, 8), positions, meta, cache, attention, experts)
    step = decoder_layer.prepare_step(hidden, positions, meta, cache, attention, experts)
    with pytest.raises(ValueError, match="each pool must be"):
        decoder_layer.attention_block(step, None, attention, (cache[0], cache[1][:5]))
    with pytest.raises(ValueError, match="partial must be"):
        decoder_layer.moe_block(step, torch.randn(3, hidden_size), experts)
    with pytest.raises(ValueError, match="the MoE half must be shaped"):
        decoder_layer.moe_block(step, step.attn_out, attention)
    meta.slot_mapping = torch.tensor([4, 24])  # 6 blocks of 4 slots
    step = decoder_layer.prepare_step(hidden, positions, meta, cache, attention, experts)
    with pytest.raises(ValueError, match="a slot outside the pools"):
        decoder_layer.attention_block(step, None, attention, cache)
