"""The draw of sampled rows (shards/draw.py): the C kernel (shards/kernels/sampling.c draw_tokens) against
the torch reference, token for token, over peaked, flat and tied rows and every cut; the reference's
passes of a few rows on the CPU; what makes the CPU op fall back to torch."""

import math

import pytest
import torch

from mixserve.shards import draw
from mixserve.shards.kernels import sampling as sampling_kernels
from mixserve.shards.ops import cpu, reference


@pytest.fixture(scope="module")
def kernel():
    if not sampling_kernels.available():
        pytest.skip("the C sampling kernels do not build here")
    return sampling_kernels.draw_tokens


def _rows(vocab: int, count: int, seed: int) -> torch.Tensor:
    """Peaked rows (a trained model's), flat ones, rounded ones full of ties, and one of a few values."""
    g = torch.Generator().manual_seed(seed)
    peaked = torch.randn(count, vocab, generator=g) * 2
    peaked[:, :8] += torch.rand(count, 8, generator=g) * 12
    flat = torch.randn(count, vocab, generator=g) * 0.3
    tied = (torch.randn(count, vocab, generator=g) * 2).round()
    few = torch.randint(0, 3, (count, vocab), generator=g).float()
    return torch.cat([peaked, flat, tied, few])  # [4 count, V]


def _settings(rows: int, vocab: int, seed: int) -> tuple[list[float], list[int], list[float], list[float]]:
    g = torch.Generator().manual_seed(seed)
    temperature = (0.2 + torch.rand(rows, generator=g) * 1.5).tolist()
    top_k = torch.randint(0, vocab + 2, (rows,), generator=g) * (torch.rand(rows, generator=g) < 0.5)
    top_p = torch.where(torch.rand(rows, generator=g) < 0.7, 0.05 + 0.95 * torch.rand(rows, generator=g), 1.0)
    uniforms = torch.rand(rows, generator=g, dtype=torch.float64).tolist()
    return temperature, top_k.tolist(), top_p.tolist(), uniforms


@pytest.mark.parametrize("vocab", [40, 3000, 32000])
def test_the_kernel_draws_the_tokens_torch_draws(kernel, vocab):
    logits = _rows(vocab, 12, vocab)
    rows = logits.shape[0]
    for seed in range(4):
        temperature, top_k, top_p, uniforms = _settings(rows, vocab, 100 * vocab + seed)
        ours = kernel(logits, temperature, top_k, top_p, uniforms)
        theirs = draw.draw_tokens(logits, temperature, top_k, top_p, [1.0] * rows, [0.0] * rows, uniforms)
        assert torch.equal(ours, theirs), (ours != theirs).nonzero().flatten().tolist()


def test_the_kernel_keeps_what_the_cuts_keep_across_the_unit_interval(kernel):
    # Uniforms spread over [0, 1) reach every kept token of a small row and no other.
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.5, -1.0, 2.5, 0.0, 3.0]])
    uniforms = [(i + 0.5) / 4000 for i in range(4000)]
    for top_k, top_p, kept in (
        (0, 1.0, set(range(8))),
        (4, 1.0, {0, 2, 7, 3}),
        (0, 0.4, {0, 2}),
        (5, 0.9, {0, 2, 3, 5, 7}),
    ):
        rows = logits.expand(len(uniforms), -1).contiguous()
        n = len(uniforms)
        ours = kernel(rows, [1.0] * n, [top_k] * n, [top_p] * n, uniforms)
        assert set(ours.tolist()) == kept
        theirs = draw.draw_tokens(rows, [1.0] * n, [top_k] * n, [top_p] * n, [1.0] * n, [0.0] * n, uniforms)
        assert torch.equal(ours, theirs)


def test_the_cpu_op_falls_back_to_torch_for_infinities_and_typical_cuts(kernel):
    logits = torch.tensor([[0.5, -math.inf, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert kernel(logits, [1.0, 1.0], [0, 0], [1.0, 1.0], [0.3, 0.6]) is None
    settings = ([1.0, 0.7], [0, 2], [0.9, 1.0], [1.0, 0.5], [0.0, 0.0], [0.3, 0.6])
    assert torch.equal(cpu.draw_tokens(logits, *settings), reference.draw_tokens(logits, *settings))
    assert cpu.draw_tokens(logits, *settings)[0].item() != 1  # -inf is never drawn


def test_min_p_keeps_the_tokens_transformers_min_p_warper_keeps():
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = _rows(300, 4, 7)  # peaked, flat, tied and few-valued rows
    uniforms = [(i + 0.5) / 2000 for i in range(2000)]
    for min_p in (0.05, 0.3, 0.9):
        kept = MinPLogitsWarper(min_p)(None, logits.clone()).isfinite()  # [R, V]
        for row in range(logits.shape[0]):
            n = len(uniforms)
            rows = logits[row : row + 1].expand(n, -1).contiguous()
            # Through the CPU op (min-p rows take the torch reference), uniforms spread over [0, 1).
            drawn = cpu.draw_tokens(rows, [1.0] * n, [0] * n, [1.0] * n, [1.0] * n, [min_p] * n, uniforms)
            assert set(drawn.tolist()) <= set(kept[row].nonzero().flatten().tolist())
            assert kept[row, drawn].all() and logits[row, drawn].max() == logits[row].max()
    # min_p 1: only the most likely token (ties aside) is ever drawn.
    row = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    ones = [1.0] * 50
    drawn = draw.draw_tokens(row.expand(50, -1), ones, [0] * 50, ones, ones, ones, uniforms[:50])
    assert set(drawn.tolist()) == {1}


def test_the_kernel_refuses_settings_it_cannot_take(kernel):
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="one temperature, top_k, top_p and uniform per row"):
        kernel(logits, [1.0], [0, 0], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="must be > 0"):
        kernel(logits, [0.0, 1.0], [0, 0], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="must be > 0"):
        kernel(logits, [1.0, 1.0], [0, 0], [0.0, 1.0], [0.5, 0.5])


def test_a_rows_draw_is_the_same_alone_and_in_a_pass_of_several_rows():
    # 20,000 logits a row: the torch draw takes three rows a pass on the CPU (CPU_DRAW_ELEMENTS), so five
    # rows take two.
    assert draw.CPU_DRAW_ELEMENTS // 20000 == 3
    scores = torch.randn(5, 20000, generator=torch.Generator().manual_seed(4)) * 4
    uniforms = [0.1, 0.35, 0.5, 0.77, 0.93]
    together = draw.inverse_transform(scores, uniforms).tolist()
    alone = [draw.inverse_transform(scores[i : i + 1], uniforms[i : i + 1]).item() for i in range(5)]
    assert together == alone
    assert len(set(together)) > 1
