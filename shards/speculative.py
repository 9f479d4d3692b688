"""Verification of proposed tokens on a shard (speculative decoding).

A speculating sequence runs its last token and k proposed tokens as one chunk at its position, so the
logits of the chunk's k + 1 positions give the next token after each of them. The shard samples at
every position with the sequence's own seeded sampler, in order, and keeps proposal i while it equals
the token sampled before it; the first token that differs (or, with every proposal kept, the token
sampled after the last) ends the run. The sequence gains 1 to k + 1 tokens from one forward.

Why outputs do not change. The token sampled at a position is the draw an ordinary decode step makes
there: the same logits, penalties over the same history (only kept tokens enter it), the same seed
and key (the position). Greedy and seeded sampled requests therefore produce exactly the tokens they
produce without speculation. For a deterministic proposal x (n-gram lookup) this is the standard
rejection rule: x is accepted with probability p(x) under the request's sampling distribution, and
on rejection the emitted token is the draw conditioned on differing from x, i.e. p with x removed and
renormalised.

Legend: K proposals, V vocab size.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from mixserve.shards.sampling import SampleOutput, sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.token_history import TokenHistory


@dataclass(slots=True)
class VerifiedToken:
    """One token a verification step emits, with its raw-logit logprob and the top alternatives asked for."""

    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)


def num_accepted(drawn: list[int], proposed: list[int]) -> int:
    """How many leading proposals equal the token drawn before them (`drawn[i]` follows the token
    before proposal i)."""
    accepted = 0
    for token, proposal in zip(drawn, proposed, strict=False):
        if token != proposal:
            break
        accepted += 1
    return accepted


def greedy_runs(token_ids: list[int], logprobs: list[float], proposals: list[list[int]]) -> list[list[VerifiedToken]]:
    """Each sequence's tokens from greedy picks made over its rows, sequence after sequence (one row per
    sequence plus one per proposal): its proposals while they equal the picks before them, then the
    pick after the last one kept."""
    runs, at = [], 0
    for proposed in proposals:
        picks = token_ids[at : at + len(proposed) + 1]
        keep = num_accepted(picks, proposed) + 1
        runs.append([VerifiedToken(picks[i], logprobs[at + i]) for i in range(keep)])
        at += len(proposed) + 1
    return runs


def verify(
    logits: Tensor, proposed: list[int], params: SamplingParams, history: TokenHistory, first_key: int
) -> list[VerifiedToken]:
    """The tokens a sequence gains from one verification step, its history extended by them.

    `logits` `[K + 1, V]`: row i is the distribution after the chunk's token i (the last token, then
    the proposals); `first_key` is the position row 0 samples (keys grow by one per row).
    """
    if logits.shape[0] != len(proposed) + 1:
        raise ValueError(
            f"need one logits row per proposal plus one: {logits.shape[0]} rows, {len(proposed)} proposals"
        )
    if params.has_repetition_penalty or params.has_output_penalty:
        # Penalties read the history, which each kept token changes: sample one position at a time.
        out: list[VerifiedToken] = []
        for i in range(len(proposed) + 1):
            token = verified_tokens(sample(logits[i : i + 1], [params], [history], [first_key + i]), [params])[0]
            history.add_output(token.token_id)
            out.append(token)
            if i == len(proposed) or token.token_id != proposed[i]:
                break
        return out
    rows = len(proposed) + 1
    tokens = verified_tokens(
        sample(logits, [params] * rows, [history] * rows, range(first_key, first_key + rows)), [params] * rows
    )
    kept = tokens[: num_accepted([t.token_id for t in tokens], proposed) + 1]
    history.add_output([t.token_id for t in kept])
    return kept


def verified_tokens(out: SampleOutput, params: Sequence[SamplingParams]) -> list[VerifiedToken]:
    """`sample`'s output as one VerifiedToken per row, each with the top alternatives its row's `params`
    ask for."""
    ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
    if out.top_ids is None or not any(p.top_n_tokens for p in params):
        return [VerifiedToken(t, lp) for t, lp in zip(ids, logprobs, strict=True)]
    top_ids, top_logprobs = out.top_ids.tolist(), out.top_logprobs.tolist()
    return [
        VerifiedToken(t, lp, list(zip(top_ids[i][: p.top_n_tokens], top_logprobs[i][: p.top_n_tokens], strict=True)))
        for i, (t, lp, p) in enumerate(zip(ids, logprobs, params, strict=True))
    ]
