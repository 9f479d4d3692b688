"""Speculation's cost back-off: the step costs it keeps (router/speculation.py's StepCosts), a request's
pauses, and the engine weighing the shards' step times; and speculating runs that go on until a sequence
is done (each sequence's own run_tokens).

The engine tests serve through a shard group that answers from a fake model and reports chosen step
times, because the back-off decides on times and a test cannot choose a real shard's. Its multi-step
runs are the shards' own (shards/multi_step.py's decode_steps); only the forward is fake."""

import argparse
import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from test_speculation import reference, true_next

from mixserve.router.engine_api import Limits
from mixserve.router.launch_serving import cost_back_off
from mixserve.router.metrics import Metrics
from mixserve.router.params import GenerationParams
from mixserve.router.replicas import build_replicas
from mixserve.router.scheduler import Scheduler, SchedulerConfig
from mixserve.router.shard_client import ShardGroup
from mixserve.router.speculation import (
    PROBE_STEPS,
    REPROBE_STEPS,
    Gains,
    Speculation,
    SpeculationState,
    StepCosts,
)
from mixserve.router.speculation_acceptance import MAX_PAUSE_TOKENS, PAUSE_TOKENS
from mixserve.router.steps import SampledToken, Step, StepResult
from mixserve.router.structured import GrammarSpec
from mixserve.shards.multi_step import decode_steps
from mixserve.shards.sequence_step import InvalidStep, SequenceResult, SequenceStep
from mixserve.shards.speculative import VerifiedToken


def test_step_costs_count_a_step_in_plain_steps_once_a_plain_one_is_timed():
    costs = StepCosts()
    assert costs.in_plain_steps(1, 3000) is None and costs.needs_plain(1)
    costs.on_step(1, True, 3000)
    costs.on_step(1, False, 1000)
    assert costs.in_plain_steps(1, 3000) == 3.0 and not costs.needs_plain(1)
    costs.on_step(1, False, 1100)
    costs.on_step(1, False, 9000)  # a step the CPU's other work slowed
    assert costs.plain_us(1) == 1100  # the median of the latest
    assert costs.in_plain_steps(2, 3000) is None and costs.needs_plain(2)  # by batch size
    assert costs.table() == ((1, 1100, 3000),)
    greedy, sampled = (True, False, False), (False, False, False)
    costs.on_speculated(greedy, 3, 1.5)
    costs.on_speculated(greedy, 1, 1.5)
    costs.on_speculated(sampled, 1, 2.0)
    # The averages of each kind's requests: a new request's prior.
    assert 1 < costs.priors[greedy].gain < 3 and costs.priors[greedy].cost == 1.5
    assert costs.priors[sampled] == Gains(1, 2.0) and (True, True, False) not in costs.priors
    for _ in range(REPROBE_STEPS):
        costs.on_step(1, True, 3000)
    assert costs.needs_plain(1)  # an old plain time is measured again


def test_an_engine_speculates_up_to_its_batch_limit_and_refuses_bad_settings():
    metrics = Metrics(Scheduler(SchedulerConfig(num_blocks=4, block_size=4)))
    speculation = Speculation(3, 8, True, metrics)
    assert speculation.allowed(8) and not speculation.allowed(9)
    # Without --speculate, requests with a predicted output still speculate (the others do not: the
    # predicted-outputs serving test).
    assert Speculation(0, 8, True, metrics).allowed(1) and not Speculation(0, 8, True, metrics).allowed(9)
    assert Speculation(0, 8, True, metrics).costs is None  # nothing to weigh without speculation
    with pytest.raises(ValueError, match="speculate must be >= 0"):
        Speculation(-1, 8, True, metrics)
    with pytest.raises(ValueError, match="speculate_max_batch must be >= 1"):
        Speculation(3, 0, True, metrics)


def test_the_back_off_is_on_with_a_draft_model_unless_told():
    def args(**flags) -> argparse.Namespace:
        return argparse.Namespace(**{"speculate_cost_back_off": None, "speculative_model": None, **flags})

    assert not cost_back_off(args()) and cost_back_off(args(speculative_model="/draft"))
    assert cost_back_off(args(speculate_cost_back_off=True))
    assert not cost_back_off(args(speculate_cost_back_off=False, speculative_model="/draft"))


def test_a_request_gaining_less_than_the_cost_pauses_longer_each_time_then_retries():
    state = SpeculationState()
    assert state.proposals(3) == 3  # not weighing: speculate
    assert state.proposals(3, weigh=True) == 3 and state.exploring  # nothing measured: speculate to measure
    state.on_speculated(1, 2.0)  # a token for two plain steps' time
    state.on_speculated(2, 2.0)
    pauses = []
    for _ in range(8):
        assert state.proposals(3, weigh=True) == 0
        pauses.append(state.paused)
        state.on_tokens(state.paused)
        assert state.proposals(3, weigh=True) == 3 and state.exploring  # after a pause, one run to measure
        state.on_speculated(1, 2.0)
    assert pauses == [min(PAUSE_TOKENS << i, MAX_PAUSE_TOKENS) for i in range(8)]
    for _ in range(8):
        state.on_speculated(4, 2.0)  # it now gains 4 tokens a step: it pays
    assert state.proposals(3, weigh=True) == 3 and not state.exploring and state.cost_pauses == 0
    # A new request starts from its kind's averages; it must gain at least what its steps cost.
    prior = Gains(gain=1.5, cost=2.0)
    assert SpeculationState().proposals(3, weigh=True, prior=prior) == 0
    prior.gain = 2.0
    assert SpeculationState().proposals(3, weigh=True, prior=prior) == 3


def test_a_new_request_starts_from_its_own_kinds_averages():
    """Free text that does not pay pauses the next free-text request at once, not a grammar-constrained
    one (whose forced tokens are mostly kept) nor one with a predicted output: each explores on its own."""
    metrics = Metrics(Scheduler(SchedulerConfig(num_blocks=4, block_size=4)))
    speculation = Speculation(3, 8, True, metrics)

    def request(seq_id: int, **params) -> SimpleNamespace:
        generation = SimpleNamespace(params=GenerationParams(temperature=0, **params), speculation=SpeculationState())
        return SimpleNamespace(seq_id=seq_id, payload=generation)

    free = request(1)
    assert speculation._proposals(free, 3) == 3 and free.payload.speculation.exploring
    for _ in range(20):
        speculation.on_tokens(free.payload.speculation, SampledToken(1, 7, 0.0, []), 1, True, 2.0)
    assert speculation.costs.priors[(True, False, False)] == Gains(1, 2.0)
    assert speculation._proposals(request(2), 3) == 0, "free text's prior: it gains less than it costs"
    constrained = request(3, grammar=GrammarSpec("json_object", "{}", "response_format"))
    predicted = request(4, prediction_ids=[5, 6, 7])
    for seq in (constrained, predicted):
        assert speculation._proposals(seq, 3) == 3 and seq.payload.speculation.exploring


def test_without_speculate_requests_speculate_on_their_own_only_where_no_other_decode_pays():
    """An engine without --speculate: predicted and constrained requests propose in steps of such requests
    alone; a free decode in the step (or --no-speculate-constrained for the constrained) makes it plain."""
    metrics = Metrics(Scheduler(SchedulerConfig(num_blocks=4, block_size=4)))

    def decode(seq_id: int, **params) -> SimpleNamespace:
        generation = SimpleNamespace(params=GenerationParams(temperature=0, **params), speculation=SpeculationState())
        return SimpleNamespace(is_prefill=False, seq=SimpleNamespace(seq_id=seq_id, payload=generation))

    def proposals(speculation: Speculation, *entries) -> dict[int, int]:
        plan = SimpleNamespace(sequences=list(entries), num_prefill_tokens=0)
        return speculation.plan_run(plan, len(entries), True, 4)[0]

    grammar = GrammarSpec("json_object", "{}", "response_format")
    constrained, predicted, free = decode(1, grammar=grammar), decode(2, prediction_ids=[5, 6]), decode(3)
    default = Speculation(0, 8, False, metrics)
    assert proposals(default, constrained, predicted) == {1: 8, 2: 8}  # OWN_K each
    assert proposals(default, constrained, predicted, free) == {}
    assert proposals(default, free) == {}
    off = Speculation(0, 8, False, metrics, constrained=False)
    assert proposals(off, predicted) == {2: 8} and proposals(off, constrained, predicted) == {}
    # With --speculate K every decode proposes, as before.
    assert proposals(Speculation(3, 8, False, metrics), constrained, free) == {1: 3, 3: 3}


def test_steps_that_found_nothing_to_propose_weigh_neither_way():
    """n-gram lookup often finds nothing: such a step gains one token for about a plain step's time. Mixed
    with steps that pay, the request keeps speculating, where a gain averaged over every step against the
    median speculating step's time would have paused it."""
    state = SpeculationState()
    for _ in range(6):
        state.on_speculated(3, 1.5)  # a verification that kept 2 proposals
        state.on_speculated(1, 1.0)  # nothing found: a plain step
        state.on_speculated(1, 1.0)
        assert state.proposals(3, weigh=True) == 3
    assert state.gains.gain < 1.5  # below the 1.5 plain steps a verification costs


@dataclass
class FakeRunner:
    """Answers steps as a shard's runner would, from `true_next` (test_speculation's fake model): of the
    proposals a step verifies, the first `good` are right (or `good[seq_id]`). Each sequence's tokens are
    kept by position, so rolled-back ones are dropped."""

    good: int | dict[int, int]
    block_size: int = 4
    tokens: dict[int, list[int]] = field(default_factory=dict)

    def step(self, steps) -> list[SequenceResult]:
        results = []
        for s in steps:
            # A draft step carries only the last token; its slots cover the proposals the shard makes.
            proposals = len(s.slot_mapping) - 1 if s.draft else s.num_proposed
            fed = s.token_ids if s.draft else s.token_ids[: len(s.token_ids) - proposals]
            known = self.tokens.get(s.seq_id, [])[: s.start_position] + list(fed)
            self.tokens[s.seq_id] = known
            if not s.sample:
                results.append(SequenceResult(s.seq_id, 0, 0.0, sampled=False))
                continue
            run = [true_next(known)]
            good = self.good if isinstance(self.good, int) else self.good[s.seq_id]
            for _ in range(min(good, proposals)):
                run.append(true_next(known + run))
            self.tokens[s.seq_id] = known + run[:-1]  # the kept proposals were written after the last token
            results.append(
                SequenceResult(
                    s.seq_id, run[0], 0.0, next_tokens=[VerifiedToken(t, 0.0) for t in run[1:]], num_drafted=proposals
                )
            )
        return results


class TimedGroup(ShardGroup):
    """A shard group whose steps take `plain_us`, or `verify_us` where proposals were asked for."""

    def __init__(self, address: str, runner: FakeRunner, plain_us: int, verify_us: int) -> None:
        super().__init__([address])
        self.runner, self.plain_us, self.verify_us = runner, plain_us, verify_us
        self.steps = {"plain": 0, "speculating": 0}
        self.interrupted: set[int] = set()

    def _result(self, sequences, results: list[SequenceResult]) -> StepResult:
        speculating = any(s.draft for s in sequences)
        self.steps["speculating" if speculating else "plain"] += 1
        tokens = [
            SampledToken(
                r.seq_id,
                r.token_id,
                r.logprob,
                [],
                sampled=r.sampled,
                next_tokens=[SampledToken(r.seq_id, n.token_id, n.logprob, []) for n in r.next_tokens],
                num_drafted=r.num_drafted,
            )
            for r in results
        ]
        return StepResult(tokens, self.verify_us if speculating else self.plain_us)

    async def step(self, step: Step) -> StepResult:
        return self._result(step.sequences, self.runner.step(step.sequences))

    async def decode_steps(self, step: Step):
        runner, sequences = self.runner, []

        class Recording:
            block_size = runner.block_size

            def step(self, current):
                sequences[:] = current
                return runner.step(current)

        stop = lambda: step.run_id in self.interrupted  # noqa: E731 - the shards' agreement, on one rank
        for results in decode_steps(Recording(), step.sequences, step.num_steps, stop):
            yield self._result(sequences, results)
            await asyncio.sleep(0)

    async def interrupt(self, run_id: int) -> None:
        self.interrupted.add(run_id)


async def serve(tmp_path, demo_tokenizer, verify_us: int, back_off: bool = True, good: int = 1):
    """One request of 1000 tokens served at k = 3 with plain steps of 1000 µs; its output, the group's step
    counts and the engine's measured step costs."""
    group = TimedGroup(f"unix:{tmp_path}/c.sock", FakeRunner(good), 1000, verify_us)
    limits = Limits(max_concurrent_requests=2, max_input_tokens=40, max_total_tokens=1100)
    config = SchedulerConfig(num_blocks=400, block_size=4)
    replicas = build_replicas(
        [(group, config)], demo_tokenizer, limits, (), 8, speculate=3, speculate_cost_back_off=back_off
    )
    engine = replicas.engines[0]
    engine.start()
    try:
        prompt = [3, 5, 1]
        generation = replicas.submit(prompt, GenerationParams(max_new_tokens=1000))
        async with asyncio.timeout(30):
            output = [event.token_id async for event in generation.stream()]
        assert output == reference(prompt, 1000)
        assert engine.scheduler.num_blocks_used == 0
        return group.steps, replicas.stats().groups[0].speculation_step_us
    finally:
        await engine.stop()
        await group.close()


async def test_speculation_stops_where_a_step_costs_more_than_it_gains(tmp_path, demo_tokenizer):
    # Two tokens a step (one proposal of three kept) against a step that costs three plain ones.
    steps, costs = await serve(tmp_path, demo_tokenizer, verify_us=3000)
    ((batch, plain, speculating),) = costs
    # A run's last step has no positions left to propose into: a plain step, though the run speculates.
    assert (batch, plain) == (1, 1000) and 2000 < speculating <= 3000
    # Pauses of 16, 32, ..., 512 tokens, each followed by a short run that measures again (without the
    # back-off: ~500 speculating steps, below).
    assert steps["plain"] > 700 and steps["speculating"] < 100, steps


async def test_speculation_goes_on_where_it_pays(tmp_path, demo_tokenizer):
    steps, costs = await serve(tmp_path, demo_tokenizer, verify_us=1500)
    ((batch, plain, speculating),) = costs
    assert (batch, plain) == (1, 1000) and 1000 < speculating <= 1500
    # The prefill and a probe run of plain steps (another after REPROBE_STEPS speculating steps).
    assert steps["plain"] <= 1 + 2 * PROBE_STEPS + 2 and steps["speculating"] > 450, steps


async def test_without_the_cost_back_off_every_step_speculates(tmp_path, demo_tokenizer):
    steps, costs = await serve(tmp_path, demo_tokenizer, verify_us=3000, back_off=False)
    # The prefill, and the last step of a run with no position left to propose into.
    assert costs == () and steps["plain"] <= 2 and steps["speculating"] > 450, steps


@pytest.mark.parametrize("good", [0, 3])
async def test_the_back_off_keeps_outputs(tmp_path, demo_tokenizer, good):
    await serve(tmp_path, demo_tokenizer, verify_us=2500, good=good)


def gained_in_run(steps: list[SequenceStep], num_steps: int) -> tuple[dict[int, int], int]:
    """Each sequence's tokens from a run of `steps` (every proposal kept: k + 1 tokens a step), and its steps."""
    runner = FakeRunner(good=3)
    runner.tokens = {1: [3, 5], 2: [6, 1]}
    gained, count = {s.seq_id: 0 for s in steps}, 0
    for results in decode_steps(runner, steps, num_steps, lambda: False):
        count += 1
        for r in results:
            gained[r.seq_id] += 1 + len(r.next_tokens)
    return gained, count


def test_a_sequence_leaves_the_run_with_its_own_run_tokens_and_the_others_go_on():
    table = list(range(10))  # 40 positions
    steps = [
        SequenceStep(1, [3], 2, [2], table, speculate=3, run_tokens=6),  # the 6 tokens it has left
        SequenceStep(2, [4], 2, [42], table, speculate=3),  # 0: the run's num_steps
    ]
    # Sequence 1 proposes only within its 6 positions (4 tokens, then 2) and leaves; sequence 2 gains the
    # run's 20 (4 x 5 steps), and its gaining them ends the run.
    assert gained_in_run(steps, 20) == ({1: 6, 2: 20}, 5)
    # Where a sequence's budget is the run's, gaining it ends the run for every sequence.
    steps[0].run_tokens = 8
    assert gained_in_run(steps, 8) == ({1: 8, 2: 8}, 2)
    with pytest.raises(InvalidStep, match="exceeds the run's 5 steps"):
        gained_in_run(steps, 5)


async def serve_two(tmp_path, demo_tokenizer, lengths: tuple[int, int]) -> tuple[list, int]:
    """Two requests of `lengths` tokens at once, at k = 3 in runs of up to 64 steps, the first keeping one
    proposal of three (slow, but not so few that it pauses) and the second every one; the outputs and the
    runs the group ran."""
    group = TimedGroup(f"unix:{tmp_path}/c.sock", FakeRunner({1: 1, 2: 3}), 1000, 1500)
    runs = 0
    decode_steps_of = group.decode_steps

    async def counted(step):
        nonlocal runs
        runs += 1
        async for result in decode_steps_of(step):
            yield result

    group.decode_steps = counted
    limits = Limits(max_concurrent_requests=2, max_input_tokens=40, max_total_tokens=1100)
    replicas = build_replicas(
        [(group, SchedulerConfig(num_blocks=400, block_size=4))],
        demo_tokenizer,
        limits,
        (),
        64,
        speculate=3,
        speculate_cost_back_off=False,
    )
    engine = replicas.engines[0]
    engine.start()
    try:
        prompts = [[3, 5, 1], [2, 7, 4]]
        generations = [
            replicas.submit(p, GenerationParams(max_new_tokens=n)) for p, n in zip(prompts, lengths, strict=True)
        ]
        outputs = []
        async with asyncio.timeout(30):
            for generation in generations:
                outputs.append([event.token_id async for event in generation.stream()])
        assert outputs == [reference(p, n) for p, n in zip(prompts, lengths, strict=True)]
        assert engine.scheduler.num_blocks_used == 0
        return outputs, runs
    finally:
        await engine.stop()
        await group.close()


async def test_speculating_sequences_run_to_their_own_ends(tmp_path, demo_tokenizer):
    # The slow request's 40 tokens and the fast one's first 256 in one run (the slow one leaves it at 40),
    # then the fast one's rest in another. Bounded by what the nearest to its end had left, the runs ended
    # each time the fast one had gained that much: 11 runs.
    _, runs = await serve_two(tmp_path, demo_tokenizer, (40, 300))
    assert runs == 2
