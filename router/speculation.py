"""Speculation on the router: each request's counters and back-off, and how many tokens it may have
proposed.

The shards make every proposal: n-gram lookup in the sequence's own tokens (shards/ngram.py, the
default for `--speculate K`) or their draft model (`--speculative-model DIR`, shards/draft.py). The
router only decides how many each decode may have, reserving their slots in a single step (the
scheduler treats the reserved positions like proposed tokens and rolls back those not kept), or, in a
multi-step run, letting the shards propose before each of its steps within the blocks the run covers.

Speculation backs off where it does not pay:
- per request: after `MISSES_TO_PAUSE` verification steps in a row that kept no proposal, the request
  proposes nothing for its next `PAUSE_TOKENS` tokens, then tries again;
- per batch: verification runs k + 1 tokens per sequence, free while a step is bound by reading the
  weights (small batches), not once it is bound by compute. A step verifies at most `VERIFY_ROWS`
  positions, so each of B running requests has at most VERIFY_ROWS // B - 1 proposals (`width`), and
  above `MAX_BATCH` running requests the engine proposes nothing and steps are plain decodes
  (multi-step runs included).
Pure Python, no torch.
"""

from dataclasses import dataclass

# Running requests above which no request speculates (the engine's default; --speculate-max-batch).
MAX_BATCH = 8
# Positions one speculating step verifies at most. On the trained demo's random workload (2 CPU shards),
# 8 requests at k = 5 (48 rows a step) ran 17 % slower than plain decoding, at k = 3 (32 rows) 2 % faster
# (benchmarks/results/compare-spec-runs-random).
VERIFY_ROWS = 32
MISSES_TO_PAUSE = 4
PAUSE_TOKENS = 16


def width(k: int, running: int) -> int:
    """Proposals each of `running` requests may have when the engine speculates with `k`: at most k, and
    with their last tokens at most VERIFY_ROWS positions in all."""
    return max(0, min(k, VERIFY_ROWS // max(running, 1) - 1))


@dataclass(slots=True)
class SpeculationState:
    """One request's speculation: its counters and its back-off."""

    proposed: int = 0
    accepted: int = 0
    misses: int = 0  # verification steps in a row that kept no proposal
    paused: int = 0  # tokens left to generate without proposals

    def proposals(self, k: int) -> int:
        """How many tokens this request may have proposed for it next: `k`, or 0 while it backs off."""
        return 0 if self.paused else k

    def on_tokens(self, count: int) -> None:
        """The request gained `count` tokens (a pause counts them down)."""
        self.paused = max(0, self.paused - count)

    def on_verified(self, proposed: int, accepted: int) -> None:
        """A verification step of `proposed` tokens kept `accepted` of them."""
        self.proposed += proposed
        self.accepted += accepted
        self.misses = 0 if accepted else self.misses + 1
        if self.misses >= MISSES_TO_PAUSE:
            self.misses = 0
            self.paused = PAUSE_TOKENS
