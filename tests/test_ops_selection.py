"""mixserve.shards.ops: each op's implementation chosen once per shard (`--kernels torch` never reaches C,
`native` does, a model step reaches C only where chosen), the choices by device and dtype, the kernels
report, and a Triton backend supplying the ops it has."""

import sys
import types

import pytest
import torch
from ops_helpers import paged_pools

from mixserve.shards import devices, ops
from mixserve.shards.kernels import (
    decoder_layer,
    decoder_stack,
    elementwise,
    linear,
    moe,
    paged_attention,
    prefill_attention,
    sampling,
)
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.ops import reference

CPU = torch.device("cpu")
# Every C entry point the ops reach, by module.
C_WRAPPERS = {
    paged_attention: ["paged_decode_attention"],
    prefill_attention: ["paged_prefill_attention"],
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


def _call_every_op(chosen: ops.Ops) -> None:
    """Each op once, at shapes every backend takes."""
    x, weight = torch.randn(3, 16), torch.rand(16)
    chosen.rms_norm(x, weight, 1e-5)
    chosen.rms_norm(x, weight, 1e-5, torch.randn(3, 16))
    cos, sin = torch.randn(32, 8), torch.randn(32, 8)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cache = paged_pools()
    chosen.rotary_write_kv(torch.tensor([0, 1, 2]), q, k, v, cos, sin, cache, torch.tensor([0, 1, 2]))
    tables, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 3])
    chosen.paged_decode_attention(torch.randn(2, 4, 8), cache, tables, lens, 0.3, None)
    starts = torch.tensor([0, 2], dtype=torch.int32)
    chosen.paged_prefill_attention(
        torch.randn(2, 4, 8), cache, starts, torch.tensor([3], dtype=torch.int32), tables, 0.3
    )
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
    # Routing has no C kernel of its own: the decoder-layer kernel routes inside itself. Prefill attention takes
    # its kernel where the build's vectors are AVX2's (prefill_attention.beats_torch).
    prefill = ["paged_prefill_attention"] if prefill_attention.beats_torch() else []
    torch_ops = {"write_kv", "topk_softmax"} | (set() if prefill else {"paged_prefill_attention"})
    assert {name for name, backend in native.backends.items() if backend == "torch"} == torch_ops
    _call_every_op(native)
    assert c_calls == [
        "rms_norm",
        "rms_norm",
        "rotary",
        "rotary",
        "paged_decode_attention",
        *prefill,
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
