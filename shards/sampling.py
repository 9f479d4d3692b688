"""Next-token sampling on a shard: penalties, greedy, temperature, top-k, top-p, seeded draws.

Every rank of a tensor-parallel group ends a step with the same full logits and runs this same
code, so the draw must be a pure function of (request seed, per-step key): no communication, the
same token on every rank, in every run, whatever else shares the batch. The request's settings are
shards/sampling_params.py, the penalties and masks shards/logits_processors.py.

Shapes:
    B  sequences sampling this step (rows of the logits)
    V  vocabulary size
    R  the subset of rows a stage works on (rows that draw at random)
    N  the most top alternatives any row asked for (top_n_tokens)
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mixserve.shards import ops
from mixserve.shards.host_to_device import to_device
from mixserve.shards.logits_processors import apply_penalties
from mixserve.shards.sampling_params import MASK64, SamplingParams
from mixserve.shards.token_history import TokenHistory


@dataclass(slots=True)
class SampleOutput:
    """What `sample` chose. Log-probabilities are of the logits given (after logit_bias and any grammar mask),
    before penalties, temperature and the cuts."""

    token_ids: Tensor  # [B] long
    logprobs: Tensor  # [B] float32
    top_ids: Tensor  # [B, N] long, most probable first
    top_logprobs: Tensor  # [B, N] float32


def generator_seed(seed: int, key: int) -> int:
    """The seed of the row generator for a request seed and a per-step key (both taken mod 2**64).

    Hashing both (splitmix64) instead of adding them keeps (seed, key + 1) and (seed + 1, key)
    from drawing the same noise.
    """
    return _splitmix64(_splitmix64(seed & MASK64) ^ (key & MASK64))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _uniforms(seeds: list[int]) -> list[float]:
    """One uniform in [0, 1) per seed, from the CPU's generator on any device, so that a seed draws the same
    u everywhere."""
    generator = torch.Generator()
    uniforms = []
    for seed in seeds:
        generator.manual_seed(seed)
        uniforms.append(torch.rand(1, generator=generator, dtype=torch.float64).item())
    return uniforms


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory],
    keys: Sequence[int],
) -> SampleOutput:
    """Choose one next token per row of `logits` `[B, V]`.

    `keys[i]` is the per-step key of row i (the position being sampled): with the row's seed it
    fixes the random draw, so a row draws the same token on every rank, in every run, in any batch.
    Order: penalties, greedy argmax, temperature, top-k, top-p, min-p, typical, seeded draw. Returns the
    tokens, their log-probabilities under `logits` and the top `max(top_n_tokens)` alternatives.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if not len(params) == len(histories) == len(keys) == batch:
        raise ValueError(
            f"need one params, history and key per row: {batch} rows, {len(params)} params, "
            f"{len(histories)} histories, {len(keys)} keys"
        )
    logits = logits.float()
    device = logits.device
    top_n = min(max((p.top_n_tokens for p in params), default=0), vocab)
    # Without alternatives to report, a token's log-probability is its logit minus the row's
    # log-sum-exp: one op gives that and the argmax (one C call on fp32 CPU), no [B, V] log_softmax.
    stats = None if top_n else ops.current().row_argmax_logsumexp(logits)
    if stats is None:
        raw_logprobs = logits.log_softmax(dim=-1)  # [B, V]
        top_logprobs, top_ids = raw_logprobs.topk(top_n, dim=-1)  # [B, N], [B, N]
    else:
        top_logprobs, top_ids = logits.new_empty(batch, 0), torch.empty(batch, 0, dtype=torch.long, device=device)

    scores = apply_penalties(logits, params, histories)  # [B, V]
    token_ids = stats[0] if stats is not None and scores is logits else scores.argmax(dim=-1)  # [B]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        sub_params = [params[i] for i in drawn]
        every = len(drawn) == batch
        # The row index reaches the device through pinned memory: no copy here waits for the forward.
        row_index = None if every else to_device(drawn, device)  # [R]
        sub = scores if every else scores.index_select(0, row_index)  # [R, V]
        drawn_ids = ops.current().draw_tokens(
            sub,
            [p.temperature for p in sub_params],
            [p.top_k for p in sub_params],
            [p.top_p for p in sub_params],
            [p.typical_p for p in sub_params],
            [p.min_p for p in sub_params],
            _uniforms([generator_seed(params[i].seed, keys[i]) for i in drawn]),
        )
        token_ids = drawn_ids if every else token_ids.index_copy(0, row_index, drawn_ids)

    if stats is None:
        logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [B]
    else:
        logprobs = logits.gather(1, token_ids[:, None]).squeeze(1) - stats[1]  # [B]
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)
