"""Router side of speculative decoding: the n-gram proposer, its back-off, and the scheduler's
verification steps (proposals planned into free blocks, rejected positions rolled back)."""

import pytest

from router.scheduler import Scheduler, SchedulerConfig, Sequence, SequenceStatus
from router.speculation import MISSES_TO_PAUSE, PAUSE_STEPS, SpeculationState, propose

BLOCK = 4


def test_propose_continues_the_latest_occurrence_of_the_longest_suffix():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # "2 3" last occurred before 7 8 (the 3-gram "5 2 3" never did).
    assert propose(tokens, 2) == [7, 8]
    assert propose(tokens, 5) == [7, 8, 5, 2, 3]
    assert propose([4, 5, 6, 4], 3) == [5, 6, 4]  # a 1-gram
    assert propose([4, 5, 6], 3) == []
    assert propose([4, 4], 3) == [4]
    assert propose([1, 2, 1], 0) == []


def test_a_request_that_keeps_missing_pauses_then_tries_again():
    state = SpeculationState()
    tokens = [1, 2, 1]
    for _ in range(MISSES_TO_PAUSE):
        assert state.propose(tokens, 2) == [2, 1]
        state.on_verified(2, 0)
    assert [state.propose(tokens, 2) for _ in range(PAUSE_STEPS)] == [[]] * PAUSE_STEPS
    assert state.propose(tokens, 2) == [2, 1]
    state.on_verified(2, 1)
    assert (state.proposed, state.accepted) == (2 * MISSES_TO_PAUSE + 2, 1)


def true_next(tokens: list[int]) -> int:
    """The fake model: a function of the last two tokens, so its text repeats itself."""
    return (tokens[-1] * 7 + tokens[-2]) % 11


def run(scheduler: Scheduler, seq: Sequence, proposer) -> int:
    """Drive `seq` to the end, verifying its proposals against the fake model as a shard would; the
    number of steps."""
    steps = 0
    while (plan := scheduler.schedule(proposer)) is not None:
        (entry,) = plan.sequences
        steps += 1
        table = seq.block_table
        assert len(entry.slot_mapping) == len(entry.token_ids)
        assert entry.slot_mapping == table.slot_mapping(entry.start_position, len(entry.token_ids))
        known = seq.token_slice(0, entry.start_position + len(entry.token_ids) - entry.num_proposed)
        kept = [true_next(known)]
        for proposal in entry.token_ids[len(entry.token_ids) - entry.num_proposed :]:
            if proposal != kept[-1]:
                break
            known.append(proposal)
            kept.append(true_next(known))
        scheduler.on_step_done(plan, {seq.seq_id: kept if entry.sample else kept[0]})
        if entry.num_proposed and seq.status is SequenceStatus.RUNNING:
            # Rejected positions are rolled back: the table holds only blocks with computed positions.
            assert seq.num_computed == seq.num_tokens - 1
            assert len(table.blocks) == -(-seq.num_computed // BLOCK)
    return steps


def reference(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(true_next(tokens))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_verification_steps_keep_outputs_and_give_back_rejected_blocks(prefix_caching):
    scheduler = Scheduler(SchedulerConfig(num_blocks=16, block_size=BLOCK, enable_prefix_caching=prefix_caching))
    prompt = [3, 5, 1]
    counts = {"proposed": 0, "steps": 0}

    def proposer(seq: Sequence) -> list[int]:
        counts["steps"] += 1
        # Alternate right proposals (from the n-gram proposer over a repeating text) with wrong ones.
        tokens = seq.prompt_ids + seq.output_ids
        proposed = propose(tokens, 3) if counts["steps"] % 3 else [10, 10, 10]
        counts["proposed"] += len(proposed)
        return proposed

    seq = Sequence(1, list(prompt), max_new_tokens=30)
    scheduler.add(seq)
    steps = run(scheduler, seq, proposer)
    assert seq.output_ids == reference(prompt, 30)
    assert counts["proposed"] > 0
    assert steps < 30  # some proposals were accepted (one prefill, then fewer decodes than tokens)
    assert scheduler.num_blocks_used == 0
    if prefix_caching:
        # Every cached block holds verified tokens: a new sequence with the same text finds them all.
        again = Sequence(2, prompt + seq.output_ids[:20], max_new_tokens=4)
        scheduler.add(again)
        run(scheduler, again, lambda s: [])
        assert scheduler.prefix_hit_tokens == 20
        assert again.output_ids == reference(prompt + seq.output_ids[:20], 4)


def test_proposals_stop_at_max_new_tokens_and_at_the_free_blocks():
    scheduler = Scheduler(SchedulerConfig(num_blocks=3, block_size=BLOCK))
    seq = Sequence(1, [1, 2, 3, 4, 5], max_new_tokens=4)
    scheduler.add(seq)
    plan = scheduler.schedule()
    scheduler.on_step_done(plan, {1: 6})
    plan = scheduler.schedule(lambda s: [7, 8, 9, 10, 11])
    # Three more tokens may be output, so two proposals; and the blocks (12 slots) hold them.
    assert plan.sequences[0].num_proposed == 2
    assert scheduler.extend_decode(plan, 8) == 1  # a verification step is never a multi-step run
    scheduler.on_step_done(plan, {1: [7, 8, 9]})
    assert seq.output_ids == [6, 7, 8, 9]
    assert scheduler.num_blocks_used == 0  # max_new_tokens reached: finished, blocks freed
