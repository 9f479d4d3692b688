"""The C argmax/log-sum-exp against torch, and sampling's results with and without it."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.kernels.sampling import apply_token_bitmask, row_argmax_logsumexp
from mixserve.shards.ops import cpu, reference
from mixserve.shards.ops.reference import MASKED_LOGIT
from mixserve.shards.sampling import sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.token_history import TokenHistory


def test_argmax_and_logsumexp_equal_torch(native):
    logits = torch.randn(9, 1000, generator=torch.Generator().manual_seed(0)) * 4
    logits[2, 10] = logits[2, 700] = 99.0  # a tie: the first index, as torch.argmax
    logits[3] = -5.0  # a flat row
    argmax, lse = row_argmax_logsumexp(logits)
    assert torch.equal(argmax, logits.argmax(dim=-1)) and argmax[2] == 10
    torch.testing.assert_close(lse, logits.logsumexp(dim=-1))


def test_rows_under_a_grammar_mask_equal_torch(native):
    """Masked logits (far below the range of expf) count as nothing, whatever path expf takes for them."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1)) * 4
    logits[0, ::2] = MASKED_LOGIT
    logits[1, :-1] = MASKED_LOGIT  # one token left
    logits[2, 100:] = logits[2, 100:] - 95.0  # just past the floor the kernel raises differences to
    argmax, lse = row_argmax_logsumexp(logits)
    assert torch.equal(argmax, logits.argmax(dim=-1)) and argmax[1] == 999
    torch.testing.assert_close(lse, logits.logsumexp(dim=-1))
    assert lse[1] == logits[1, 999]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rows_with_non_finite_logits_take_the_torch_path(native, bad):
    logits = torch.randn(3, 64)
    logits[1, 5] = bad
    assert row_argmax_logsumexp(logits) is None
    argmax, lse = native.row_argmax_logsumexp(logits)  # the op takes the torch reference for them
    assert torch.equal(argmax, logits.argmax(dim=-1))
    torch.testing.assert_close(lse, logits.logsumexp(dim=-1), equal_nan=True)


def test_sampling_is_the_same_with_and_without_the_kernel(native):
    logits = torch.randn(6, 512, generator=torch.Generator().manual_seed(1)) * 3
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5),
        SamplingParams(),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(temperature=1.2, top_k=20, seed=7),
    ]
    histories = []
    for i in range(len(params)):
        history = TokenHistory()
        history.add_prompt([i, i + 1, 3])
        history.add_output([i + 2])
        histories.append(history)
    keys = list(range(10, 16))
    fast = sample(logits, params, histories, keys)
    ops.select("torch", torch.device("cpu"), torch.float32)
    slow = sample(logits, params, histories, keys)
    assert torch.equal(fast.token_ids, slow.token_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs)
    assert fast.top_ids.shape == slow.top_ids.shape == (6, 0)


@pytest.mark.parametrize(("vocab_start", "width"), [(0, 70), (35, 35), (64, 40)])  # the last slice holds padding
def test_bitmask_kernel_equals_the_torch_reference(native, vocab_start, width):
    """A rank's slice of the logits, some rows constrained (not in order), others left as they are."""
    gen = torch.Generator().manual_seed(vocab_start)
    vocab = 100
    logits = torch.randn(6, width + 3, generator=gen)[:, :width]  # rows a stride apart, as a slice of wider ones
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=gen, dtype=torch.int64).to(torch.int32)
    rows = [4, 0, 2]
    expected = reference.apply_token_bitmask(logits, rows, bitmask, vocab_start, vocab)
    got = cpu.apply_token_bitmask(logits, rows, bitmask, vocab_start, vocab)
    assert torch.equal(got, expected)
    assert torch.equal(got[[1, 3, 5]], logits[[1, 3, 5]])  # unconstrained rows untouched
    assert (got[rows] == MASKED_LOGIT).any() and (got[rows] != MASKED_LOGIT).any()


def test_bitmask_kernel_refuses_wrong_arguments(native):
    logits = torch.zeros(2, 64)
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="rows must index"):
        apply_token_bitmask(logits, [2], bitmask, 0, 64, MASKED_LOGIT)
    with pytest.raises(ValueError, match="constrained rows"):
        apply_token_bitmask(logits, [0, 1], bitmask, 0, 64, MASKED_LOGIT)
    with pytest.raises(ValueError, match="do not fit"):
        apply_token_bitmask(logits, [0], bitmask, 0, 65, MASKED_LOGIT)
    with pytest.raises(TypeError, match="int32"):
        apply_token_bitmask(logits, [0], bitmask.long(), 0, 64, MASKED_LOGIT)
