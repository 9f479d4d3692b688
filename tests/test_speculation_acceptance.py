"""Speculation's back-off on acceptance (router/speculation_acceptance.py): a request's pauses for keeping
too few of its proposals, its kind's prior, and the engine serving requests whose proposals are never
kept (a fake model behind the shards' own multi-step runs, as in test_speculation_cost)."""

import asyncio

from test_speculation import reference
from test_speculation_cost import FakeRunner, TimedGroup

from mixserve.router.engine_api import Limits
from mixserve.router.params import GenerationParams
from mixserve.router.replicas import build_replicas
from mixserve.router.scheduler import SchedulerConfig
from mixserve.router.speculation import SpeculationState
from mixserve.router.speculation_acceptance import (
    LOW_ACCEPTANCE,
    MIN_VERIFICATIONS,
    PRIOR_PAUSES,
    Acceptance,
    AcceptancePrior,
    pause_tokens,
)


def test_a_request_keeping_too_few_pauses_longer_each_time_until_it_keeps_enough():
    acceptance = Acceptance()
    pauses = []
    for _ in range(3):
        for _ in range(MIN_VERIFICATIONS - 1):
            assert acceptance.on_verified(3, 0) == 0  # judged only after MIN_VERIFICATIONS
        pauses.append(acceptance.on_verified(3, 0))
    assert pauses == [pause_tokens(0), pause_tokens(1), pause_tokens(2)] == [16, 32, 64]
    assert acceptance.pauses > 0  # on probation
    while acceptance.share < LOW_ACCEPTANCE:
        assert acceptance.on_verified(3, 3) == 0
    assert acceptance.pauses == 0  # kept enough: the next pause starts short again
    assert pause_tokens(20) == 512


def test_a_request_keeping_enough_never_pauses():
    acceptance = Acceptance()
    for kept in [1, 0, 2, 1, 0, 1, 3, 0, 1] * 5:  # 9 of 27 kept: a third
        assert acceptance.on_verified(3, kept) == 0
    assert acceptance.pauses == 0


def test_a_new_request_starts_from_its_kinds_prior():
    prior = AcceptancePrior()
    sampled, greedy, constrained = (False, False), (True, False), (True, True)
    assert prior.start(sampled) == (Acceptance(), 0)  # nothing seen yet
    for _ in range(100):
        prior.on_verified(sampled, 3, 0)  # sampled requests keep nothing
        prior.on_verified(greedy, 3, 0)  # nor do greedy ones of free text here
        prior.on_verified(constrained, 3, 3)  # grammar-constrained ones keep what their grammar forced
    acceptance, pause = prior.start(sampled)
    assert pause == pause_tokens(PRIOR_PAUSES) and acceptance.pauses > 0
    assert acceptance.on_verified(3, 0) == pause_tokens(PRIOR_PAUSES + 1)  # one more miss: judged at once
    assert prior.start(greedy)[1] == pause_tokens(PRIOR_PAUSES)
    assert prior.start(constrained) == (Acceptance(), 0)


def test_the_request_state_pauses_on_acceptance_and_counts_the_pause_down():
    state = SpeculationState()
    for kept in [1, 0, 0, 0]:  # never 4 misses in a row, but a twelfth kept
        assert state.proposals(3) == 3
        state.on_verified(3, kept)
    assert state.paused == pause_tokens(0)
    state.on_tokens(state.paused)
    assert state.proposals(3) == 3 and state.acceptance.pauses > 0


async def test_requests_of_a_kind_that_keeps_nothing_start_paused(tmp_path, demo_tokenizer):
    """Sampled requests whose proposals are never kept: the first learns it alone; later ones start paused
    from the engine's prior and verify far less. Outputs stay those of plain decoding, blocks return."""
    group = TimedGroup(f"unix:{tmp_path}/a.sock", FakeRunner(good=0), 1000, 1500)
    limits = Limits(max_concurrent_requests=2, max_input_tokens=40, max_total_tokens=400)
    replicas = build_replicas(
        [(group, SchedulerConfig(num_blocks=200, block_size=4))], demo_tokenizer, limits, (), 8, speculate=3
    )
    engine = replicas.engines[0]
    engine.start()
    verifications = []
    try:
        for prompt in ([3, 5, 1], [2, 7, 4], [6, 1, 9], [4, 4, 8]):
            before = group.steps["speculating"]
            generation = replicas.submit(prompt, GenerationParams(max_new_tokens=300, temperature=0.8))
            async with asyncio.timeout(30):
                assert [event.token_id async for event in generation.stream()] == reference(prompt, 300)
            assert engine.scheduler.num_blocks_used == 0
            verifications.append(group.steps["speculating"] - before)
    finally:
        await engine.stop()
        await group.close()
    assert verifications[0] >= 12, verifications  # three windows of four before pauses of 16, 32, 64
    assert max(verifications[2:]) < verifications[0] / 2, verifications
