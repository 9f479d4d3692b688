"""Speculation on the router: each request's counters and back-off, how many tokens it may have
proposed, and what verification costs the shards against a plain decode step.

The shards make every proposal: n-gram lookup in the sequence's own tokens (shards/ngram.py, the
default for `--speculate K`) or their draft model (`--speculative-model DIR`, shards/draft.py); a request
with a predicted output (OpenAI's `prediction`) proposes from it (shards/prediction.py), and a
grammar-constrained one what its grammar forces (shards/grammar.py); both speculate even where the engine
runs without `--speculate` (with OWN_K; constrained ones unless `--no-speculate-constrained`), in the
steps whose every decode is such a request, so that no request pays for rows it did not ask for. The
router only decides how many each decode may have, reserving their slots in a single step (the
scheduler treats the reserved positions like proposed tokens and rolls back those not kept), or, in a
multi-step run, letting the shards propose before each of its steps within the blocks the run covers.

Speculation backs off where it does not pay:
- per request, on misses: after `MISSES_TO_PAUSE` verification steps in a row that kept no proposal,
  the request proposes nothing for its next `PAUSE_TOKENS` tokens, then tries again;
- per request, on acceptance (router/speculation_acceptance.py): a request whose share of proposals kept
  stays below a break-even pauses, longer at each pause in a row, and a new request of a kind (greedy,
  sampled) that keeps too few lately starts paused. The shards propose before every step of a run
  whatever the router decides meanwhile, so a request that pauses for keeping too few ends the
  multi-step run it is in;
- per request, on cost (`StepCosts`): each speculating step of B sequences took the shards some time,
  which over the median plain step's at B is its cost in plain steps. Speculation pays for a request
  whose speculating steps gain it (its kept proposals plus the token sampled after them) at least the
  plain steps they cost, both averaged over its recent speculating steps (a new request starts from the
  averages of its kind's requests, as on acceptance); a step that found nothing to propose gains one
  token for about one plain step and weighs neither way. One that gains fewer pauses for `PAUSE_TOKENS`,
  doubled at each pause in a row up to `MAX_PAUSE_TOKENS` (`pause_tokens`, as the acceptance back-off's),
  and then speculates for a short run (`PROBE_STEPS`) to measure again. The
  times are the shards' own (a step's `forward_us`, drafting included), by batch size; a speculating
  engine runs a short plain run (`PROBE_STEPS`) where it has no plain time for the batch size or it is
  `REPROBE_STEPS` speculating steps old;
- per batch: verification runs k + 1 tokens per sequence, free while a step is bound by reading the
  weights (small batches), not once it is bound by compute. A step verifies at most `VERIFY_ROWS`
  positions, so each of B running requests has at most VERIFY_ROWS // B - 1 proposals (`width`), and
  above `MAX_BATCH` running requests the engine proposes nothing and steps are plain decodes
  (multi-step runs included).
None of this changes a request's tokens (a draw is keyed by its position: shards/speculative.py), only
when they come.
Pure Python, no torch.
"""

from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING

from mixserve.router.speculation_acceptance import PAUSE_TOKENS, Acceptance, AcceptancePrior, pause_tokens
from mixserve.shards.sampling_params import is_greedy

if TYPE_CHECKING:
    from mixserve.router.metrics import Metrics
    from mixserve.router.step_plan import Sequence, StepPlan
    from mixserve.router.steps import SampledToken

# Running requests above which no request speculates (the engine's default; --speculate-max-batch).
MAX_BATCH = 8
# The most proposals a step of a request that speculates on its own has where the engine runs without
# --speculate: one with a predicted output (OpenAI's `prediction`, shards/prediction.py) or a grammar (its
# forced tokens first: a JSON schema's keys, quotes and separators; shards/grammar.py).
OWN_K = 8
# Positions one speculating step verifies at most. On the trained demo's random workload (2 CPU shards),
# 8 requests at k = 5 (48 rows a step) ran 17 % slower than plain decoding, at k = 3 (32 rows) 2 % faster
# (benchmarks/results/compare-spec-runs-random).
VERIFY_ROWS = 32
MISSES_TO_PAUSE = 4
# Weight of the newest sample in the running averages of what a speculating step gains (tokens: noisy, 1
# to k + 1) and costs (plain steps): a request's, and its kind's over all its requests (a new request's prior).
REQUEST_WEIGHT = 0.25
ENGINE_WEIGHT = 0.05
# Step times kept per batch size and kind, whose median is the step's cost.
TIME_SAMPLES = 32
# A plain probe run's steps, and the speculating steps after which a batch size's plain time is re-measured.
PROBE_STEPS = 8
REPROBE_STEPS = 512


def width(k: int, running: int) -> int:
    """Proposals each of `running` requests may have when the engine speculates with `k`: at most k, and
    with their last tokens at most VERIFY_ROWS positions in all."""
    return max(0, min(k, VERIFY_ROWS // max(running, 1) - 1))


def _average(old: float | None, sample: float, weight: float) -> float:
    return sample if old is None else old + weight * (sample - old)


@dataclass(slots=True)
class Gains:
    """What speculating steps gain (tokens) and cost (plain steps), running averages: a request's own, or
    over every request of a kind (a new request's prior)."""

    gain: float | None = None
    cost: float | None = None

    def add(self, tokens: int, cost: float, weight: float) -> None:
        """A speculating step gained `tokens` and cost `cost` plain steps; `weight`: the newest sample's."""
        self.gain = _average(self.gain, tokens, weight)
        self.cost = _average(self.cost, cost, weight)


@dataclass(slots=True)
class StepCosts:
    """What decode steps cost the shards by batch size, plain and speculating (the median of the latest
    `TIME_SAMPLES`: a step slowed by the router or a client sharing the CPU moves it little), and what a
    speculating step gains a request and costs, in tokens and plain steps, averaged over the requests of
    each kind ((greedy, constrained, predicted): `SpeculationState.kind`), a new request's prior. Kinds
    gain differently: a grammar's forced tokens are mostly kept, sampled text seldom repeats itself, and a
    predicted output is the client's."""

    priors: dict[tuple[bool, ...], Gains] = field(default_factory=dict)
    _plain: dict[int, deque[float]] = field(default_factory=dict)
    _verify: dict[int, deque[float]] = field(default_factory=dict)
    # Speculating steps since the batch size's plain time was last measured.
    _since_plain: dict[int, int] = field(default_factory=dict)

    def on_step(self, batch: int, speculating: bool, shard_us: float) -> None:
        """A decode step of `batch` sequences (no prefill) took the shards `shard_us`; `speculating` if any
        of its sequences had proposals asked of the shards."""
        times = self._verify if speculating else self._plain
        if batch not in times:
            times[batch] = deque(maxlen=TIME_SAMPLES)
        times[batch].append(shard_us)
        self._since_plain[batch] = self._since_plain.get(batch, 0) + 1 if speculating else 0

    def plain_us(self, batch: int) -> float | None:
        """A plain decode step's time at `batch` sequences (None: not measured)."""
        return median(self._plain[batch]) if batch in self._plain else None

    def verify_us(self, batch: int) -> float | None:
        """A speculating decode step's time at `batch` sequences, drafting included (None: not measured)."""
        return median(self._verify[batch]) if batch in self._verify else None

    def on_speculated(self, kind: tuple[bool, ...], tokens: int, cost: float) -> None:
        """A speculating step of a request of `kind` gained it `tokens` (its kept proposals and the token
        after them) and cost `cost` plain steps."""
        self.priors.setdefault(kind, Gains()).add(tokens, cost, ENGINE_WEIGHT)

    def in_plain_steps(self, batch: int, shard_us: float) -> float | None:
        """A step of `batch` sequences that took `shard_us`, in plain steps (None: no plain time yet)."""
        plain = self.plain_us(batch)
        return shard_us / plain if plain else None

    def table(self) -> tuple[tuple[int, float | None, float | None], ...]:
        """(batch size, plain µs, speculating µs) for every batch size measured, smallest first."""
        sizes = sorted(self._plain.keys() | self._verify.keys())
        return tuple((b, self.plain_us(b), self.verify_us(b)) for b in sizes)

    def needs_plain(self, batch: int) -> bool:
        """Whether the next run at `batch` sequences should be a short plain one, to measure a plain step."""
        return batch not in self._plain or self._since_plain.get(batch, 0) >= REPROBE_STEPS


@dataclass(slots=True)
class SpeculationState:
    """One request's speculation: its counters and its back-off."""

    proposed: int = 0
    accepted: int = 0
    misses: int = 0  # verification steps in a row that kept no proposal
    paused: int = 0  # tokens left to generate without proposals
    gains: Gains = field(default_factory=Gains)  # what its speculating steps gain it and cost, averaged
    cost_pauses: int = 0  # pauses in a row for gaining too few tokens a step
    retry: bool = False  # a cost pause ended: speculate for a run whatever the average says
    exploring: bool = False  # the last proposals were to measure (a retry, or nothing to weigh yet)
    acceptance: Acceptance = field(default_factory=Acceptance)
    # Its kind for the engine's priors, (greedy, grammar-constrained, predicted); None: not seen by the engine yet.
    kind: tuple[bool, bool, bool] | None = None

    def proposals(self, k: int, weigh: bool = False, prior: Gains | None = None) -> int:
        """How many tokens this request may have proposed for it next: `k`, or 0 while it backs off. With
        `weigh`, a request whose speculating steps gain it fewer tokens than they cost plain steps (its
        averages, else `prior`'s, its kind's) pauses; `exploring` then says whether the answer was only
        to measure (nothing to weigh yet, or a pause just ended)."""
        self.exploring = False
        if self.paused or not k:
            return 0
        if not weigh:
            return k
        gains = self.gains if self.gains.gain is not None else prior
        if self.retry or gains is None or gains.gain is None or gains.cost is None:
            self.retry = False
            self.exploring = True
            return k
        if gains.gain >= gains.cost:
            self.cost_pauses = 0
            return k
        self.paused = pause_tokens(self.cost_pauses)
        self.cost_pauses += 1
        self.retry = True
        return 0

    def on_tokens(self, count: int) -> None:
        """The request gained `count` tokens (a pause counts them down)."""
        self.paused = max(0, self.paused - count)

    def on_speculated(self, tokens: int, cost: float) -> None:
        """A step that asked the shards for proposals gained the request `tokens` (1 if they made none) and
        cost `cost` plain steps."""
        self.gains.add(tokens, cost, REQUEST_WEIGHT)

    def on_verified(self, proposed: int, accepted: int) -> bool:
        """A verification step of `proposed` tokens kept `accepted` of them; True where the request paused
        for keeping too few (a pause after misses in a row is short, and waits for the run's end)."""
        self.proposed += proposed
        self.accepted += accepted
        self.misses = 0 if accepted else self.misses + 1
        pause = self.acceptance.on_verified(proposed, accepted)
        if self.misses >= MISSES_TO_PAUSE:
            self.misses = 0
            self.paused = max(self.paused, PAUSE_TOKENS)
        self.paused = max(self.paused, pause)
        return pause > 0


class Speculation:
    """One engine's speculation: which decodes of a step have proposals and how many tokens its run may
    gain, the step costs its back-off weighs, and the proposed / accepted counters. Requests with a predicted
    output, and grammar-constrained ones, speculate even where the engine does not (k = 0)."""

    def __init__(
        self, k: int, max_batch: int, cost_back_off: bool, metrics: "Metrics", constrained: bool = True
    ) -> None:
        """`k`: the most proposals a decode has (0: only requests with a predicted output, and with
        `constrained` grammar-constrained ones, speculate, with OWN_K), while at most `max_batch` requests
        run; with `cost_back_off`, requests pause where speculating costs more than it gains."""
        if k < 0:
            raise ValueError(f"speculate must be >= 0, got {k}")
        if max_batch < 1:
            raise ValueError(f"speculate_max_batch must be >= 1, got {max_batch}")
        self.k = k
        self.max_batch = max_batch
        self.constrained = constrained
        self.costs = StepCosts() if cost_back_off and k else None
        self.prior = AcceptancePrior()
        self.metrics = metrics
        self.proposed = 0
        self.accepted = 0

    def allowed(self, running: int) -> bool:
        """Whether decodes may speculate with `running` requests in the batch (counted before scheduling)."""
        return running <= self.max_batch

    def plan_run(self, plan: "StepPlan", running: int, allowed: bool, max_steps: int) -> tuple[dict[int, int], int]:
        """For `plan`, just scheduled with `running` requests: each decode's proposals (by sequence id) and
        the most a multi-step run of it may gain (tokens: `max_steps` decode steps, times k + 1 where any
        decode speculates; a short run where it speculates, or runs plain, to measure)."""
        k = width(self.k or OWN_K, running) if allowed else 0
        decodes = [e.seq for e in plan.sequences if not e.is_prefill]
        if k and self._probes_plain(plan, decodes):
            # A short plain run measures what a plain step costs at this batch size.
            k, max_steps = 0, min(max_steps, PROBE_STEPS)
        proposing = decodes if self.k else self._on_their_own(decodes)
        proposals = {seq.seq_id: self._proposals(seq, k) for seq in proposing} if k else {}
        if any(proposals.values()):
            if self.costs is not None and any(seq.payload.speculation.exploring for seq in decodes):
                # Speculating to measure (its cost or a request's gain): a short run, then decide again.
                max_steps = min(max_steps, PROBE_STEPS)
            max_steps *= 1 + k
        return proposals, max_steps

    def on_step(self, plan: "StepPlan", shard_us: int, timed: bool) -> tuple[set[int], float | None]:
        """A step of `plan` took the shards `shard_us`: the sequences the shards were asked to propose for,
        and the step's cost in plain steps (None: not weighed: untimed, prefilling, or no plain time yet).
        A `timed` all-decode step's time joins the step costs."""
        # The shards make every proposal (a draft entry's, or a speculating run's) and say how many.
        proposing = {e.seq.seq_id for e in plan.sequences if e.draft or e.speculate}
        if self.costs is None or not timed or plan.num_prefill_tokens:
            return proposing, None
        self.costs.on_step(len(plan.sequences), bool(proposing), shard_us)
        return proposing, self.costs.in_plain_steps(len(plan.sequences), shard_us) if proposing else None

    def on_tokens(
        self, state: SpeculationState, token: "SampledToken", kept: int, proposing: bool, step_cost: float | None
    ) -> bool:
        """A request's step answered `token` (and the tokens after it), of which it `kept` the first (a stop,
        EOS or max_new_tokens drops the rest); `proposing` if the shards were asked to propose for it, the
        step costing `step_cost` plain steps (None: not weighed). True where the request paused just now on
        its share kept (the multi-step run it is in should end, or its shards go on proposing)."""
        state.on_tokens(kept)
        if not proposing:
            return False
        gained = 1 + len(token.next_tokens)
        if self.costs is not None and step_cost is not None:
            # A step's gain and cost are weighed together, so a step that found nothing to propose (one
            # token for about a plain step) weighs neither way.
            state.on_speculated(gained, step_cost)
            if state.kind is not None:
                self.costs.on_speculated(state.kind, gained, step_cost)
        if token.num_drafted:
            # Proposals that reached the output: the tokens kept, less the one sampled after them. The
            # shards may have made fewer proposals than the slots reserved for them.
            accepted = min(kept, gained - 1)
            paused = state.on_verified(token.num_drafted, accepted)
            if state.kind is not None:
                self.prior.on_verified(state.kind, token.num_drafted, accepted)
            self.proposed += token.num_drafted
            self.accepted += accepted
            self.metrics.on_speculated(token.num_drafted, accepted)
            return paused
        return False

    def _on_their_own(self, decodes: list["Sequence"]) -> list["Sequence"]:
        """Without --speculate: the decodes that propose, all of them where every one has a predicted output
        or (unless the engine says not) a grammar, else none. A verification's rows cost the whole step
        (each may route to experts the others do not), so the requests that did not ask for it would pay
        for them: on the CPU demo, with half of 8 requests under a JSON schema speculating in every step,
        the free half took 1.30x the time a token it took among free requests alone, 1.14x where none
        speculated (benchmarks/results/constrained-by-default)."""
        for seq in decodes:
            params = seq.payload.params
            if not params.prediction_ids and not (self.constrained and params.grammar is not None):
                return []
        return decodes

    def _proposals(self, seq: "Sequence", k: int) -> int:
        """How many tokens (at most `k`) the shards may propose for `seq`'s next step (the scheduler keeps
        those that fit)."""
        generation = seq.payload
        state = generation.speculation
        if state.kind is None:
            # First seen: it starts from what its kind has kept lately.
            params = generation.params
            state.kind = (
                is_greedy(params.temperature, params.top_k),
                params.grammar is not None,
                bool(params.prediction_ids),
            )
            state.acceptance, pause = self.prior.start(state.kind)
            state.paused = max(state.paused, pause)
        if self.costs is None:
            return state.proposals(k)
        return state.proposals(k, True, self.costs.priors.get(state.kind))

    def _probes_plain(self, plan: "StepPlan", decodes: list["Sequence"]) -> bool:
        """Whether this all-decode step should run plain to measure a plain step at its batch size: a
        request would otherwise speculate and that measurement is missing or old."""
        if self.costs is None or plan.num_prefill_tokens or not self.costs.needs_plain(len(decodes)):
            return False
        return any(not seq.payload.speculation.paused for seq in decodes)
