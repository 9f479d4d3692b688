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


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 7, MAX_ROWS])
def test_a_rows_bits_do_not_depend_on_its_neighbours(native, rows):
    """fp32 weights: a row's result is the same bits alone or among others (the loop takes rows of x three,
    two or one at a time against each block of weight rows, every dot product summed the same way), so a
    verification step's rows and a batch's decodes equal plain decodes."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 272, generator=gen)
    weight = torch.randn(1030, 272, generator=gen)
    together = native.linear_rows(x, weight)
    for row in range(rows):
        assert torch.equal(native.linear_rows(x[row : row + 1], weight)[0], together[row])
    assert torch.equal(native.linear_rows(x[1:].contiguous(), weight), together[1:])
