"""How many tokens a sequence's n-gram lookup proposes next: its proposal length, adapted to what its
verifications kept (`--speculate-length adaptive`, the default).

A verification of k proposals runs k + 1 rows, and on an MoE model each row may route to experts the
others do not, so a step's cost grows with k: on the demo (one CPU shard, fp32, an AVX2 EPYC) decode
steps of 2, 4 and 6 rows took 1.29x, 1.74x and 2.1x a one-row step (`mixserve bench latency`). Text
that a sequence copies well keeps long runs of proposals and pays for a large k; text it does not
keeps few and pays only for a small one, and the same request moves between the two. The length
therefore follows the sequence's own verifications, as Hugging Face's assisted generation schedules
its assistant's tokens: two more after a verification that kept every proposal, one fewer (down to 1)
after one that did not; it starts at, and never exceeds, what the step allows (`--speculate K`, less
where the router or the end of a multi-step run narrows it).

benchmarks/results/proposal-length replays both rules over greedy outputs of the copy and corpus
workloads with those step costs, and measures them served (at K = 8, +12 % on corpus prompts; at
K = 3 about level).

Every rank sees the same verifications, so every rank keeps the same length without a collective.
The tokens a request produces do not change, only how many are proposed at a time. Pure Python.
"""

# --speculate-length: the length adapted as below, or fixed at what each step allows.
MODES = ("adaptive", "fixed")
# Proposals added after a verification that kept all of them, and removed after one that did not.
GROW = 2
SHRINK = 1


class ProposalLength:
    """One sequence's proposal length: `allowed(k)` before a lookup, `on_verified` after its verification."""

    __slots__ = ("length",)

    def __init__(self) -> None:
        self.length: int | None = None  # None: no verification yet, propose all the step allows

    def allowed(self, k: int) -> int:
        """Tokens to propose where the step allows `k` (>= 0)."""
        return k if self.length is None else min(k, self.length)

    def on_verified(self, k: int, proposed: int, accepted: int) -> None:
        """A verification of `proposed` (> 0) tokens, the step allowing `k`, kept `accepted` of them."""
        # From the length the step used: a step allowing few (the end of a multi-step run, a wide batch) moves
        # it little, and it stays within two of the most any step allowed.
        length = self.allowed(k)
        self.length = length + GROW if accepted == proposed else max(1, length - SHRINK)
