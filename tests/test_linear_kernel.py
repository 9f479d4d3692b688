"""The C few-rows linear (the LM head's) against F.linear."""

import pytest
import torch
import torch.nn.functional as F

from shards.kernels import native as native_kernels
from shards.kernels.linear import MAX_ROWS, linear


@pytest.mark.parametrize("rows", [1, 2, 3, 8, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("out_features,in_features", [(8192, 256), (1030, 64), (102, 40), (7, 20)])
def test_kernel_equals_f_linear(native, rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_other_inputs_take_f_linear(native):
    weight = torch.randn(16, 8)
    x = torch.randn(2, 8)
    for args in ((x.double(), weight.double()), (x, weight.t().contiguous().t()), (x[None], weight)):
        torch.testing.assert_close(linear(*args), F.linear(*args))
    native_kernels.select("torch")
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
