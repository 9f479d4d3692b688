"""The LM head's row cap measured at warm-up (shards/head_rows.py): the sizes it times, the cap the ranks
keep (never below the build's), what linear_rows and the decode step's one C call then take, and that
int8 heads keep their own rule."""

import pytest
import torch
from test_kernel_tokens import demo_runner

from mixserve.shards import ops
from mixserve.shards.head_rows import LADDER, measure_head_rows
from mixserve.shards.kernels import linear
from mixserve.shards.ops import cpu_rows
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.runner import ModelRunner


@pytest.fixture
def runner_for(native, demo_dir):  # noqa: F811 - the conftest fixture that chooses the C kernels
    """A runner of the demo in a dtype (optionally int8-wo), its ops chosen as `auto` serves that dtype."""

    def make(dtype: torch.dtype, quantization: QuantizationConfig | None = None) -> ModelRunner:
        if ops.select("auto", torch.device("cpu"), dtype).backends["linear_rows"] != "native":
            pytest.skip("the linear kernel does not build here")
        return demo_runner(demo_dir, dtype, quantization)

    yield make
    linear.set_measured_rows(None)
    ops.select("auto", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_head_is_timed_until_torch_is_clearly_faster_and_its_cap_followed(runner_for, dtype):
    r = runner_for(dtype)
    cap, timings = measure_head_rows(r, 256)
    sizes = [rows for rows, _, _ in timings]
    assert sizes == list(LADDER[: len(sizes)])
    assert all(kernel_s > 0 and torch_s > 0 for _, kernel_s, torch_s in timings)
    assert sizes[-1] == LADDER[-1] or cap < sizes[-1]  # the whole ladder, unless torch won on the way
    assert cap in (linear.MAX_ROWS, *LADDER) and linear.max_rows() == cap
    head = r.model.kernel_ends().head
    assert cpu_rows.linear_in_kernel(dtype, cap, head) and not cpu_rows.linear_in_kernel(dtype, cap + 1, head)


def test_the_router_s_largest_batch_bounds_the_rows_timed(runner_for):
    cap, timings = measure_head_rows(runner_for(torch.float32), 8)
    assert [rows for rows, _, _ in timings] == [LADDER[0]]  # the smallest size is timed all the same
    assert cap in (linear.MAX_ROWS, LADDER[0])


def test_int8_heads_are_not_timed_and_keep_the_build_s_cap(runner_for):
    linear.set_measured_rows(64)
    assert measure_head_rows(runner_for(torch.float32, QuantizationConfig("int8-wo")), 256) is None
    assert linear.max_rows() == linear.MAX_ROWS
