"""The C few-rows linear (the LM head's) against F.linear, through the linear_rows op."""

import pytest
import torch
import torch.nn.functional as F

from mixserve.shards import ops
from mixserve.shards.kernels import linear as kernel
from mixserve.shards.kernels.linear import MAX_ROWS


@pytest.mark.parametrize("rows", [1, 2, 3, 8, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("out_features,in_features", [(8192, 256), (1030, 64), (102, 40), (7, 20)])
def test_kernel_equals_f_linear(native, rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    torch.testing.assert_close(native.linear_rows(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_other_inputs_take_f_linear(native, monkeypatch):
    calls = []
    real = kernel.linear_rows
    monkeypatch.setattr(kernel, "linear_rows", lambda *a: calls.append(1) or real(*a))
    weight = torch.randn(16, 8)
    x = torch.randn(2, 8)
    for args in ((x.double(), weight.double()), (x, weight.t().contiguous().t()), (x[None], weight)):
        torch.testing.assert_close(native.linear_rows(*args), F.linear(*args))
    assert not calls
    native.linear_rows(x, weight)
    assert calls == [1]
    torch.testing.assert_close(
        ops.select("torch", torch.device("cpu"), torch.float32).linear_rows(x, weight), F.linear(x, weight)
    )
    assert calls == [1]
