"""The top-k / top-p masks of a shard's sampling (shards/logits_processors.py): what each keeps, ties to the
lower ids, per row in a batch, and the CPU's nucleus search against sorting every row."""

import math

import pytest
import torch

from mixserve.shards.logits_processors import NUCLEUS_FIRST, _mask_sorted, mask_top_k_top_p


def _kept(logits: list[float], top_k: int = 0, top_p: float = 1.0) -> set[int]:
    masked = mask_top_k_top_p(torch.tensor([logits]), torch.tensor([top_k]), torch.tensor([top_p]))
    return set(torch.nonzero(masked[0] > -math.inf).flatten().tolist())


def test_top_k_keeps_exactly_the_k_highest():
    assert _kept([1.0, 5.0, 3.0, 4.0, 2.0], top_k=2) == {1, 3}
    assert _kept([1.0, 5.0, 3.0, 4.0, 2.0], top_k=1) == {1}
    assert _kept([1.0, 5.0, 3.0, 4.0, 2.0], top_k=0) == {0, 1, 2, 3, 4}
    assert _kept([1.0, 5.0, 3.0, 4.0, 2.0], top_k=99) == {0, 1, 2, 3, 4}


def test_top_k_ties_at_the_kth_value_keep_exactly_k_lowest_ids():
    assert _kept([1.0, 3.0, 3.0, 3.0, 0.0], top_k=2) == {1, 2}
    assert _kept([3.0, 3.0, 9.0, 3.0, 3.0], top_k=3) == {0, 1, 2}


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        # Sorted probabilities 0.50 (id 1), 0.25 (id 2), 0.15 (id 3), 0.10 (id 0).
        (1e-9, {1}),
        (0.49, {1}),
        (0.51, {1, 2}),
        (0.74, {1, 2}),
        (0.76, {1, 2, 3}),
        (0.89, {1, 2, 3}),
        (0.91, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    assert _kept(torch.tensor([0.10, 0.50, 0.25, 0.15]).log().tolist(), top_p=top_p) == kept


def test_top_p_is_computed_on_the_top_k_survivors():
    logits = torch.tensor([0.10, 0.50, 0.25, 0.15]).log().tolist()
    assert _kept(logits, top_p=0.6) == {1, 2}
    # Renormalised over ids 1 and 2 the first already holds 2/3 >= 0.6.
    assert _kept(logits, top_k=2, top_p=0.6) == {1}


def test_top_p_ties_keep_the_lowest_ids():
    assert _kept([0.0, 0.0, 0.0, 0.0], top_p=0.3) == {0, 1}


def test_top_p_of_one_keeps_even_a_negligible_tail():
    assert _kept([30.0, 0.0, -30.0, -80.0], top_p=1.0) == {0, 1, 2, 3}


def test_masks_are_per_row_in_a_batch():
    logits = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    top_k = torch.tensor([0, 5, 1, 12, 0])
    top_p = torch.tensor([0.5, 1.0, 0.3, 0.8, 1.0])  # the last row has no cut
    batched = mask_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(batched[4], logits[4])
    for i in range(5):
        torch.testing.assert_close(
            batched[i : i + 1], mask_top_k_top_p(logits[i : i + 1], top_k[i : i + 1], top_p[i : i + 1])
        )
    assert (batched[1] > -math.inf).sum() == 5
    torch.testing.assert_close(batched[batched > -math.inf], logits[batched > -math.inf])


@pytest.mark.parametrize("vocab", [40, 3000])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_the_cpu_nucleus_keeps_what_sorting_every_row_keeps(vocab, scale):
    # Rounded logits tie often; at scale 0.3 over 3000 tokens the nucleus outgrows the 64 largest logits
    # the CPU path reads first by far, and the binned mass sizes the selection.
    generator = torch.Generator().manual_seed(vocab + int(10 * scale))
    logits = (torch.randn(24, vocab, generator=generator) * scale).round()  # [R, V]
    top_k = torch.randint(0, vocab + 2, (24,), generator=generator) * (torch.rand(24, generator=generator) < 0.5)
    top_p = torch.where(torch.rand(24, generator=generator) < 0.8, torch.rand(24, generator=generator), 1.0)
    kept = mask_top_k_top_p(logits, top_k, top_p) > -math.inf
    assert torch.equal(kept, _mask_sorted(logits, top_k, top_p) > -math.inf)
    if scale == 0.3 and vocab == 3000:
        assert kept.sum(dim=-1).max() > 10 * NUCLEUS_FIRST
