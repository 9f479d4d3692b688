"""Speculation's back-off on acceptance: a request whose proposals are seldom kept stops proposing for a
while, doubling the while at each such pause in a row, and a new request starts from what its kind
(greedy or sampled, free or grammar-constrained, with a predicted output or not) has kept lately. Part
of router/speculation.py's back-off.

A verification of k proposals costs about a plain step and k rows; it pays where the share of proposals
kept is at least `LOW_ACCEPTANCE` (a k = 3 verification of one sequence took 1.73x a plain step on the
CPU demo: 1 + 3 x 0.25 tokens is its break-even). Sampled requests keep far fewer n-gram proposals than
greedy ones (~10 % against 55-60 % on the trained demo's corpus workload: sampled text seldom repeats
itself), and a request lives a few hundred tokens, too few to learn that on its own while, in a batch,
each of its proposals makes the whole step a verification
(benchmarks/results/spec-sampled-back-off). Constrained requests propose what their grammar forces and
keep ~90 % of it (benchmarks/results/structured-speculation), whatever free text keeps, so they are a kind
of their own; so are requests that propose from a predicted output (OpenAI's `prediction`). Pure Python, no torch.
"""

from dataclasses import dataclass, field

LOW_ACCEPTANCE = 0.25
# Verification steps since the last pause (or the start) before the average may pause the request.
MIN_VERIFICATIONS = 4
# Weight of the newest verification in a request's running average, and in its kind's.
WEIGHT = 0.25
PRIOR_WEIGHT = 0.05
PAUSE_TOKENS = 16
MAX_PAUSE_TOKENS = 512
# A new request of a kind whose proposals are seldom kept starts as if it had paused this many times.
PRIOR_PAUSES = 2


def pause_tokens(pauses: int) -> int:
    """The tokens of a request's pause after `pauses` pauses in a row."""
    return min(PAUSE_TOKENS << pauses, MAX_PAUSE_TOKENS)


@dataclass(slots=True)
class Acceptance:
    """One request's share of proposals kept, averaged over its verification steps."""

    share: float | None = None
    verifications: int = 0  # since its last pause, or its start
    pauses: int = 0  # pauses in a row for keeping too few

    def on_verified(self, proposed: int, accepted: int) -> int:
        """A verification step of `proposed` (> 0) tokens kept `accepted`: the tokens to pause for (0: none)."""
        share = accepted / proposed
        self.share = share if self.share is None else self.share + WEIGHT * (share - self.share)
        self.verifications += 1
        if self.share >= LOW_ACCEPTANCE:
            self.pauses = 0
            return 0
        if self.verifications < MIN_VERIFICATIONS:
            return 0
        self.verifications = 0
        self.pauses += 1
        return pause_tokens(self.pauses - 1)


@dataclass(slots=True)
class AcceptancePrior:
    """The share of proposals kept, averaged over every request of a kind ((greedy, constrained, predicted):
    router/speculation.py's `SpeculationState.kind`)."""

    shares: dict[tuple[bool, ...], float] = field(default_factory=dict)

    def on_verified(self, kind: tuple[bool, ...], proposed: int, accepted: int) -> None:
        """A request of the kind had `proposed` (> 0) tokens verified and `accepted` of them kept."""
        share = accepted / proposed
        old = self.shares.get(kind)
        self.shares[kind] = share if old is None else old + PRIOR_WEIGHT * (share - old)

    def start(self, kind: tuple[bool, ...]) -> tuple[Acceptance, int]:
        """A new request's acceptance and the tokens it starts paused for: where its kind keeps too few, its
        kind's average, one verification short of being judged, as if it had paused PRIOR_PAUSES times."""
        share = self.shares.get(kind)
        if share is None or share >= LOW_ACCEPTANCE:
            return Acceptance(), 0
        acceptance = Acceptance(share=share, verifications=MIN_VERIFICATIONS - 1, pauses=PRIOR_PAUSES + 1)
        return acceptance, pause_tokens(PRIOR_PAUSES)
