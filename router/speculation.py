"""Speculation on the router: the proposers, and each request's counters and back-off.

Two proposers, one chosen per engine: n-gram lookup here (the default for `--speculate K`), or the
shards' draft model (`--speculative-model DIR`, shards/draft.py), for which the router only reserves
the proposals' positions (an int instead of tokens; the scheduler treats both alike).

N-gram speculation (prompt lookup): proposals from the request's own tokens.

Text that copies from its context (code edits, summaries, extraction, repeated structure) continues
the way it went before. The proposer takes the longest suffix of the sequence's tokens (prompt and
output, `MAX_NGRAM` down to `MIN_NGRAM` tokens) that occurred earlier, latest occurrence first, and
proposes the tokens that followed it there (vLLM's `ngram` and TGI's `--speculate` without a Medusa
head). The shards verify the proposals in one step (shards/speculative.py) and keep what their sampler
agrees with, so outputs never change; a wrong proposal costs only compute.

Speculation backs off where it does not pay, with either proposer:
- per request: after `MISSES_TO_PAUSE` verification steps in a row that kept no proposal, the request
  proposes nothing for `PAUSE_STEPS` decode steps, then tries again;
- per batch: verification runs k + 1 tokens per sequence, free while a step is bound by reading the
  weights (small batches), not once it is bound by compute. Above `MAX_BATCH` running requests the
  engine proposes nothing and steps are plain decodes (multi-step runs included).
Pure Python, no torch.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mixserve.router.scheduler import Sequence

MAX_NGRAM = 3
# A single repeated token predicts its successor poorly: on the trained demo's corpus workload (128-token
# passages, 128 greedy tokens, k = 5) 1-token matches brought acceptance from 45 % to 40 % and cost
# verification steps that kept nothing (benchmarks/RESULTS.md, speculation).
MIN_NGRAM = 2
# Running requests above which no request speculates (the engine's default; --speculate-max-batch).
MAX_BATCH = 8
MISSES_TO_PAUSE = 4
PAUSE_STEPS = 16


def propose(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (`max_ngram` down to `min_ngram` tokens long); [] when no suffix occurred before."""
    if k < 1:
        return []
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        first = suffix[0]
        # An occurrence starting at i is followed by tokens[i + n], which must exist before the suffix.
        for i in range(length - n - 1, -1, -1):
            if tokens[i] == first and tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


@dataclass(slots=True)
class SpeculationState:
    """One request's speculation: its counters and its back-off."""

    proposed: int = 0
    accepted: int = 0
    misses: int = 0  # verification steps in a row that kept no proposal
    paused: int = 0  # decode steps left without proposals

    def ready(self) -> bool:
        """Whether this request proposes in its next step (not while it backs off; each call counts one
        step of the pause)."""
        if self.paused:
            self.paused -= 1
            return False
        return True

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """The n-gram proposals for this request's next step (none while it backs off)."""
        return propose(tokens, k) if self.ready() else []

    def on_verified(self, proposed: int, accepted: int) -> None:
        """A verification step of `proposed` tokens kept `accepted` of them."""
        self.proposed += proposed
        self.accepted += accepted
        self.misses = 0 if accepted else self.misses + 1
        if self.misses >= MISSES_TO_PAUSE:
            self.misses = 0
            self.paused = PAUSE_STEPS


class NgramProposer:
    """Proposals looked up in the request's own tokens."""

    def __call__(self, state: SpeculationState, seq: "Sequence", k: int) -> list[int]:
        """Up to `k` tokens for `seq`'s next step."""
        return state.propose(seq.prompt_ids + seq.output_ids, k)


class DraftProposer:
    """Proposals made by the shards' draft model: the router asks for `k` and reserves their slots."""

    def __call__(self, state: SpeculationState, seq: "Sequence", k: int) -> int:
        """How many tokens the draft model proposes for `seq`'s next step (0 while it backs off)."""
        return k if state.ready() else 0
