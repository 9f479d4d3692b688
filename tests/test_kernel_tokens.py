"""The decoder layer kernel's token cap measured at warm-up (shards/kernel_tokens.py): the choice from
timings, the cap it sets on the demo model and what the runner and the MoE then take, and that both
paths of a step near the cap give the same next token."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernel_tokens import LADDER, MARGIN, choose_cap, measure_and_cap
from mixserve.shards.kernels import moe
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

BLOCK = 16


def test_the_cap_is_the_last_size_before_torch_is_clearly_faster():
    level = [(16, 1.0, 2.0), (32, 1.0, 1.0), (64, 1.0, MARGIN * 1.01)]  # torch never clearly faster
    assert choose_cap(level, 128) == 128
    assert choose_cap([*level, (128, 1.0, MARGIN * 0.99)], 128) == 64
    assert choose_cap([(16, 1.0, 2.0), (32, 1.0, 0.5)], 128) == 16
    assert choose_cap([(16, 1.0, 0.5)], 128) == 8  # torch ahead at the smallest size: decode sizes keep it
    assert choose_cap([], 64) == 64


def demo_runner(demo_dir, dtype: torch.dtype, quantization=None) -> ModelRunner:
    """One rank's runner of the demo in `dtype` (optionally quantized), with a small KV cache."""
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    model = load_model(demo_dir, parallel, group, dtype=dtype, quantization=quantization)
    r = ModelRunner(model, parallel, group, torch.device("cpu"), dtype, BLOCK)
    r.allocate_cache(32)
    return r


@pytest.fixture
def runner(native, demo_dir):  # noqa: F811 - the conftest fixture that chooses the C kernels
    if native.backends["decoder_layers"] != "native":
        pytest.skip("the decoder layer kernel does not build here")
    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    r = ModelRunner(model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.float32, BLOCK)
    r.allocate_cache(32)
    yield r
    moe.set_measured_cap(None)


def test_measuring_sets_the_cap_the_runner_and_the_moe_follow(runner):
    measured = measure_and_cap(runner, 4096)
    assert measured is not None
    cap, timings = measured
    assert cap <= moe.TIMED_MAX_TOKENS and (cap in LADDER or cap == LADDER[0] // 2)
    assert [tokens for tokens, _, _ in timings] == list(LADDER[: len(timings)])
    assert all(kernel_s > 0 and torch_s > 0 for _, kernel_s, torch_s in timings)
    assert ops.current().decoder_layers_max_tokens == cap
    assert moe.fits(cap) and not moe.fits(cap + 1)
    assert not runner.sequences  # the timed steps left nothing behind


def test_a_second_warm_up_measures_from_the_builds_cap_again(runner):
    ops.set_decoder_layer_tokens(16)
    moe.set_measured_cap(16)
    cap, timings = measure_and_cap(runner, 4096)
    assert timings[0][0] == LADDER[0] and ops.current().decoder_layers_max_tokens == cap
    assert moe.fits(cap)


def test_the_router_s_largest_step_bounds_the_sizes_timed(runner):
    cap, timings = measure_and_cap(runner, 32)
    assert [tokens for tokens, _, _ in timings] == [tokens for tokens in LADDER if tokens <= 32][: len(timings)]
    # Sizes past the router's largest step are never timed: the kernel keeps its own cap where torch was
    # not clearly faster up to 32 tokens (no larger step comes), else the cap is a size timed or half the first.
    assert cap == moe.TIMED_MAX_TOKENS or cap in (LADDER[0] // 2, *(tokens for tokens, _, _ in timings))


def test_a_step_past_the_cap_runs_torch_s_layers_and_picks_the_same_token(runner, kernel_layers):
    # 129 tokens: a 128-token prompt's prefill with its BOS, past the 8-float build's cap, within what is timed.
    prompt = [1 + (7 * i) % 500 for i in range(129)]
    kernel_calls = kernel_layers

    def first_token(tokens_cap: int | None) -> tuple[int, list[float], int]:
        kernel_calls.clear()
        moe.set_measured_cap(tokens_cap)
        ops.set_decoder_layer_tokens(tokens_cap if tokens_cap is not None else moe.max_tokens())
        table = list(range(-(-len(prompt) // BLOCK)))
        step = SequenceStep(7, prompt, 0, list(range(len(prompt))), table, True, SamplingParams(top_n_tokens=5))
        try:
            result = runner.step([step])[0]
        finally:
            runner.sequences.clear()
        return result.token_id, [logprob for _, logprob in result.top_tokens], len(kernel_calls)

    kernel_token, kernel_top, kernel_layers = first_token(moe.TIMED_MAX_TOKENS)
    token, top, layers = first_token(16)  # past a cap of 16: torch's layers
    assert kernel_layers == runner.config.num_hidden_layers and layers == 0
    assert token == kernel_token and len(top) == 5
    torch.testing.assert_close(torch.tensor(top), torch.tensor(kernel_top), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_models_measure_where_their_gemm_path_has_the_bf16_dot_product(demo_dir, dtype):
    """An int8 model in bf16, on a CPU with the bf16 dot product, times its kernels against its
    dequantize-then-GEMM path and follows the cap; in fp32 (the kernels run every size) it is not timed."""
    from mixserve.shards import devices
    from mixserve.shards.quant.config import QuantizationConfig

    chosen = ops.select("auto", torch.device("cpu"), dtype)
    try:
        if chosen.backends["decoder_layers"] != "native":
            pytest.skip("the decoder layer kernel does not build here")
        measured = measure_and_cap(demo_runner(demo_dir, dtype, QuantizationConfig("int8-wo")), 64)
        if dtype is torch.bfloat16 and devices.cpu_has_bf16():
            assert measured is not None
            cap, timings = measured
            assert [tokens for tokens, _, _ in timings] == list(LADDER[: len(timings)])
            assert ops.current().decoder_layers_max_tokens == cap and moe.fits(cap) and not moe.fits(cap + 1)
        else:
            assert measured is None
    finally:
        moe.set_measured_cap(None)
        ops.select("auto", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_model_is_timed_past_the_build_s_cap_until_torch_is_clearly_faster(demo_dir, dtype):
    """The build's cap (64 tokens with 8-float vectors) is for steps nothing timed: a warm-up times the
    ladder up to moe.TIMED_MAX_TOKENS, and stops early only where torch was clearly faster."""
    chosen = ops.select("auto", torch.device("cpu"), dtype)
    try:
        if chosen.backends["decoder_layers"] != "native":
            pytest.skip("the decoder layer kernel does not build here")
        r = demo_runner(demo_dir, dtype)
        cap, timings = measure_and_cap(r, 4096)
        sizes = [tokens for tokens, _, _ in timings]
        assert sizes == list(LADDER[: len(sizes)])
        assert sizes[-1] == moe.TIMED_MAX_TOKENS or cap < sizes[-1]
        assert ops.current().decoder_layers_max_tokens == cap and moe.fits(cap) and not moe.fits(cap + 1)
        assert not r.sequences
    finally:
        moe.set_measured_cap(None)
        ops.select("auto", torch.device("cpu"), torch.float32)
