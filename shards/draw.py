"""The random draw of sampled rows in torch, any device: each row divided by its temperature, cut by its
top-k, top-p, min-p and typical mass (shards/logits_processors.py), and one token drawn by inverse transform
sampling with the row's uniform. It is the reference of the `draw_tokens` op (shards/ops/), whose C
kernel (shards/kernels/sampling.c) does the same cuts and sums a row at a time on the CPU.

Shapes:
    R  rows that draw at random
    V  vocabulary size
"""

import torch
from torch import Tensor

from mixserve.shards.host_to_device import to_device
from mixserve.shards.logits_processors import mask_min_p, mask_top_k_top_p, mask_typical

# Logits a pass of inverse_transform takes on the CPU: 512 KiB of float64 sums.
CPU_DRAW_ELEMENTS = 1 << 16


def draw_tokens(
    logits: Tensor,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    typical_p: list[float],
    min_p: list[float],
    uniforms: list[float],
) -> Tensor:
    """One token per row of `logits` `[R, V]`, `[R]` int64: the row over its temperature (> 0), its
    top-k (0: off), top-p (1: off), min-p (0: off) and typical (1: off) cuts, then `inverse_transform`
    with its uniform."""
    device = logits.device
    scores = logits / to_device(temperature, device, torch.float32)[:, None]  # [R, V]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        scores = mask_top_k_top_p(scores, to_device(top_k, device), to_device(top_p, device, torch.float32))
    if any(p > 0 for p in min_p):
        scores = mask_min_p(scores, to_device(min_p, device, torch.float32))
    if any(p < 1 for p in typical_p):
        scores = mask_typical(scores, to_device(typical_p, device, torch.float32))
    return inverse_transform(scores, uniforms)


def inverse_transform(scores: Tensor, uniforms: list[float]) -> Tensor:
    """For each row of `scores` `[R, V]` and its uniform u in [0, 1), the first token (in token order) whose
    cumulative probability passes u; -inf entries add no probability and are never drawn. One exp and one
    cumulative sum over the vocabulary, each row on its own: an exponential race (argmax of p / E over an
    Exp(1) draw per token) takes a log per token, ~6x the time on the CPU. The uniforms reach the device
    through pinned memory, so nothing here waits for the step's forward."""
    u = to_device(uniforms, scores.device, torch.float64)[:, None]  # [R, 1]
    # On the CPU a few rows at a time, so that their float64 sums stay in the core's cache (a [32, 32000]
    # block of them took 2.5x the time of 32 rows one by one); every row at once elsewhere. Each row's
    # token is the same either way.
    rows = max(1, CPU_DRAW_ELEMENTS // scores.shape[1]) if scores.is_cpu else scores.shape[0]
    return torch.cat([_inverse_transform(scores[i : i + rows], u[i : i + rows]) for i in range(0, len(u), rows)])


def _inverse_transform(scores: Tensor, u: Tensor) -> Tensor:
    """inverse_transform's token for each row of `scores` [R, V] given its uniform `u` [R, 1]."""
    top = scores.max(dim=-1, keepdim=True).values  # [R, 1]
    cdf = (scores - top).exp().double().cumsum(dim=-1)  # [R, V] unnormalised
    total = cdf[:, -1:]  # [R, 1]
    # u * total < total, unless it rounds up to it: the largest double below total keeps the token drawn
    # one whose probability is not 0.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # [R, 1]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [R]
    return torch.where(top.squeeze(1).isfinite(), drawn, 0)  # a row with no finite logit: token 0, as argmax
