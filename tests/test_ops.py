"""mixserve.shards.ops: each op's implementation chosen once per shard (`--kernels torch` never reaches C,
`native` does), the varlen prefill reference against per-token decode attention, and the C kernel
wrappers refusing wrong arguments before any pointer reaches C."""

import sys
import types

import pytest
import torch

from mixserve.shards import devices, ops
from mixserve.shards.kernels import decoder_layer, decoder_stack, elementwise, linear, moe, paged_attention, sampling
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.ops import reference

CPU = torch.device("cpu")
# Every C entry point the ops reach, by module.
C_WRAPPERS = {
    paged_attention: ["paged_decode_attention"],
    moe: ["moe_experts"],
    elementwise: ["rms_norm", "rotary"],
    linear: ["linear_rows"],
    sampling: ["row_argmax_logsumexp", "slice_greedy_stats", "combine_greedy"],
    decoder_layer: ["attention_block", "moe_block"],
    decoder_stack: ["run"],
}


@pytest.fixture
def c_calls(monkeypatch):
    """The names of the C wrappers called, in order (each still runs)."""
    calls: list[str] = []
    for module, names in C_WRAPPERS.items():
        for name in names:
            real = getattr(module, name)

            def record(*args, _real=real, _name=name, **kwargs):
                calls.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, record)
    yield calls
    ops.select("auto", CPU, torch.float32)


def _pools(blocks=6, block_size=4, kv_heads=2, head_dim=8):
    gen = torch.Generator().manual_seed(0)
    shape = (blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _call_every_op(chosen: ops.Ops) -> None:
    """Each op once, at shapes every backend takes."""
    x, weight = torch.randn(3, 16), torch.rand(16)
    chosen.rms_norm(x, weight, 1e-5)
    chosen.rms_norm(x, weight, 1e-5, torch.randn(3, 16))
    cos, sin = torch.randn(32, 8), torch.randn(32, 8)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cache = _pools()
    chosen.rotary_write_kv(torch.tensor([0, 1, 2]), q, k, v, cos, sin, cache, torch.tensor([0, 1, 2]))
    tables, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 3])
    chosen.paged_decode_attention(torch.randn(2, 4, 8), cache, tables, lens, 0.3, None)
    hidden, w13, w2 = torch.randn(3, 16), torch.randn(4, 12, 16), torch.randn(4, 16, 6)
    chosen.topk_softmax(torch.randn(3, 4), 2)
    chosen.fused_moe(hidden, w13, w2, torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [1, 2]]))
    chosen.linear_rows(hidden, torch.randn(10, 16))
    chosen.row_argmax_logsumexp(torch.randn(2, 10))
    packed = chosen.slice_greedy_stats(torch.randn(2, 10), 0)
    chosen.combine_greedy(torch.stack([packed, packed], dim=1))


def test_torch_never_reaches_the_c_kernels(c_calls):
    chosen = ops.select("torch", CPU, torch.float32)
    assert set(chosen.backends.values()) == {"torch"} and chosen.decoder_layers_max_tokens == 0
    _call_every_op(chosen)
    assert c_calls == []


def test_native_runs_each_op_in_its_kernel(native, c_calls):
    # Routing has no C kernel of its own: the decoder-layer kernel routes inside itself.
    assert {name for name, backend in native.backends.items() if backend == "torch"} == {
        "write_kv",
        "paged_prefill_attention",
        "topk_softmax",
    }
    _call_every_op(native)
    assert c_calls == [
        "rms_norm",
        "rms_norm",
        "rotary",
        "rotary",
        "paged_decode_attention",
        "moe_experts",
        "linear_rows",
        "row_argmax_logsumexp",
        "slice_greedy_stats",
        "combine_greedy",
    ]


def test_a_model_step_reaches_c_only_where_chosen(demo_dir, c_calls):
    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.loader import load_model
    from mixserve.shards.runner import ModelRunner
    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.sequence_step import SequenceStep

    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), CPU, torch.float32, 4)
    greedy = SamplingParams(temperature=0.0)

    def run() -> list[int]:
        runner.allocate_cache(8)
        prompt = SequenceStep(0, [3, 4, 5, 6, 7], 0, [0, 1, 2, 3, 4], [0, 1], True, greedy)
        first = runner.step([prompt])[0].token_id
        return [first, runner.step([SequenceStep(0, [first], 5, [5], [0, 1], True, None)])[0].token_id]

    ops.select("torch", CPU, torch.float32)
    by_torch = run()
    assert c_calls == []
    if ops.select("auto", CPU, torch.float32).backends["decoder_layers"] != "native":
        pytest.skip("the C kernels do not build here")
    assert run() == by_torch
    # Both steps ran every layer in the kernel: all in one decoder_stack call each on one rank.
    layers = model.config.num_hidden_layers
    assert c_calls.count("attention_block") + layers * c_calls.count("run") == 2 * layers


def test_choices_follow_device_and_dtype():
    assert set(ops.select("auto", CPU, torch.float16).backends.values()) == {"torch"}
    with pytest.raises(KernelUnavailable, match="fp32 or bf16 on the CPU"):
        ops.select("native", CPU, torch.float16)
    bf16 = ops.select("auto", CPU, torch.bfloat16).backends
    fp32 = ops.select("auto", CPU, torch.float32).backends
    # Every kernel but rotary's (test_native_runs_each_op_in_its_kernel lists fp32's): the others read bf16
    # weights or KV pools, round as transformers does (the norm), or read the logits sampling widens to fp32.
    if fp32["decoder_layers"] == "native":
        native = {
            dtype: {name for name, b in backends.items() if b == "native"}
            for dtype, backends in (("bf16", bf16), ("fp32", fp32))
        }
        assert native["bf16"] == native["fp32"] - {"rotary", "rotary_write_kv"}
    with pytest.raises(KernelUnavailable, match="fp32 or bf16 on the CPU"):
        ops.select("native", torch.device("cuda", 0), torch.float32)
    ops.select("auto", CPU, torch.float32)


def test_the_kernels_report_says_which_path_the_c_kernels_take():
    torch_only = ops.kernels_report(ops.select("torch", CPU, torch.bfloat16), torch.bfloat16)
    expected = {
        "backends": dict.fromkeys(ops.OP_NAMES, "torch"),
        "vector_floats": 0,
        "bf16_dot_products": False,
        "amx_tile_products": False,
    }
    assert torch_only == expected
    report = ops.kernels_report(ops.select("auto", CPU, torch.bfloat16), torch.bfloat16)
    if report["backends"]["linear_rows"] == "native":
        assert report["vector_floats"] == moe.vector_floats() in (1, 8, 16)
        # The dot product needs AVX-512 and the CPU's bf16 instructions (and a build that uses them).
        assert not report["bf16_dot_products"] or (report["vector_floats"] == 16 and devices.cpu_has_bf16())
        # AMX's tiles take a bf16 model's larger products only beside the dot product, on a CPU with them.
        assert report["amx_tile_products"] == (report["bf16_dot_products"] and moe.amx_tile_products())
        assert not report["amx_tile_products"] or devices.cpu_has_amx_bf16()
    # An fp32 model has no bf16 weights to meet the dot product, whatever the build.
    fp32 = ops.kernels_report(ops.select("auto", CPU, torch.float32), torch.float32)
    assert not fp32["bf16_dot_products"] and not fp32["amx_tile_products"]


def test_triton_ops_are_one_function_of_the_op_name(monkeypatch):
    """A backend supplies the ops it has; the rest keep the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend = types.ModuleType("mixserve.shards.triton")
    backend.rms_norm = reference.rms_norm
    backend.interpreted = lambda: True  # as the real package is on CPU tensors
    monkeypatch.setitem(sys.modules, "mixserve.shards.triton", backend)
    try:
        chosen = ops.select("triton", CPU, torch.float32)
    finally:
        ops.select("auto", CPU, torch.float32)
    assert chosen.rms_norm is reference.rms_norm and chosen.backends["rms_norm"] == "triton"
    assert {backend for name, backend in chosen.backends.items() if name != "rms_norm"} == {"torch"}


def test_prefill_reference_equals_one_decode_query_per_token():
    """Chunks at offsets (one starting at 0, one after 5 cached positions), with a sliding window."""
    k_pool, v_pool = _pools(blocks=8)
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


# -- the C wrappers refuse wrong arguments -------------------------------------------------------


def test_decode_attention_refuses_wrong_arguments(native):
    cache = _pools()
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
    cache = _pools()
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
