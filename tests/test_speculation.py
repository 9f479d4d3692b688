"""Router side of speculative decoding: each request's back-off, and the scheduler's verification steps
(proposals planned into free blocks, rejected positions rolled back) and speculating runs; the shards'
n-gram lookup (shards/ngram.py) stands in for the proposals."""

import random

import pytest

from mixserve.router.scheduler import Scheduler, SchedulerConfig
from mixserve.router.speculation import MISSES_TO_PAUSE, VERIFY_ROWS, SpeculationState, width
from mixserve.router.speculation_acceptance import PAUSE_TOKENS
from mixserve.router.step_plan import ScheduledSequence, Sequence, SequenceStatus, StepPlan
from mixserve.shards.ngram import propose

BLOCK = 4


def test_a_request_that_keeps_missing_pauses_then_tries_again():
    state = SpeculationState()
    for _ in range(MISSES_TO_PAUSE):
        assert state.proposals(3) == 3
        state.on_verified(3, 0)
    state.on_tokens(PAUSE_TOKENS - 1)
    assert state.proposals(3) == 0  # the pause counts tokens
    state.on_tokens(1)
    assert state.proposals(3) == 3
    state.on_verified(2, 1)
    assert (state.proposed, state.accepted, state.misses) == (3 * MISSES_TO_PAUSE + 2, 1, 0)


def test_the_batch_shares_the_verified_positions():
    assert width(5, 1) == 5
    assert width(5, 8) == VERIFY_ROWS // 8 - 1 == 3  # 8 x (3 + 1) positions
    assert width(2, 8) == 2
    assert width(5, VERIFY_ROWS // 2) == 1
    assert width(5, VERIFY_ROWS) == 0  # one position each: plain decodes
    assert width(3, 0) == 3


def scheduled(scheduler: Scheduler, proposer) -> StepPlan | None:
    """The next step, with `proposer`'s proposals where the step preempted nothing (as the engine plans a
    single step)."""
    plan = scheduler.schedule()
    if plan is not None and not plan.preempted:
        scheduler.add_proposals(plan, proposer)
    return plan


def true_next(tokens: list[int]) -> int:
    """The fake model: a function of the last two tokens, so its text repeats itself."""
    return (tokens[-1] * 7 + tokens[-2]) % 11


def verified(seq: Sequence, entry: ScheduledSequence) -> list[int]:
    """What a shard answers for a sampling entry: the proposals the fake model agrees with, then its next token."""
    known = seq.token_slice(0, entry.start_position + len(entry.token_ids) - entry.num_proposed)
    kept = [true_next(known)]
    for proposal in entry.token_ids[len(entry.token_ids) - entry.num_proposed :]:
        if proposal != kept[-1]:
            break
        known.append(proposal)
        kept.append(true_next(known))
    return kept


def run(scheduler: Scheduler, seq: Sequence, proposer) -> int:
    """Drive `seq` to the end, verifying its proposals against the fake model as a shard would; the
    number of steps."""
    steps = 0
    while (plan := scheduled(scheduler, proposer)) is not None:
        (entry,) = plan.sequences
        steps += 1
        table = seq.block_table
        assert len(entry.slot_mapping) == len(entry.token_ids)
        assert entry.slot_mapping == table.slot_mapping(entry.start_position, len(entry.token_ids))
        scheduler.on_step_done(plan, {seq.seq_id: verified(seq, entry)} if entry.sample else {})
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
    plan = scheduled(scheduler, lambda s: [7, 8, 9, 10, 11])
    # Three more tokens may be output, so two proposals; and the blocks (12 slots) hold them.
    assert plan.sequences[0].num_proposed == 2
    assert scheduler.extend_decode(plan, 8) == 1  # a verification step is never a multi-step run
    scheduler.on_step_done(plan, {1: [7, 8, 9]})
    assert seq.output_ids == [6, 7, 8, 9]
    assert scheduler.num_blocks_used == 0  # max_new_tokens reached: finished, blocks freed


@pytest.mark.parametrize("seed", range(4))
def test_many_speculating_sequences_under_preemption_keep_their_kv_and_outputs(seed):
    """Several sequences in a cache too small for all (preemptions), random proposals (right or wrong),
    prefix caching on with a shared first block: every step reads only slots holding the sequence's own
    tokens, outputs match the fake model, and every block comes back."""
    rng = random.Random(seed)
    scheduler = Scheduler(SchedulerConfig(num_blocks=12, block_size=BLOCK, max_batch_prefill_tokens=8))
    slots: dict[int, int] = {}  # the fake cache: the token written at each slot

    def proposer(seq: Sequence) -> list[int]:
        tokens = seq.prompt_ids + seq.output_ids
        return propose(tokens, 3) if rng.random() < 0.6 else [rng.randrange(11) for _ in range(rng.randrange(1, 4))]

    # A shared first block, so later admissions share cached blocks.
    prompts = {i: [1, 2, 3, 4] + [rng.randrange(11) for _ in range(rng.randrange(1, 6))] for i in range(1, 7)}
    sequences = {i: Sequence(i, list(p), max_new_tokens=rng.randrange(4, 14)) for i, p in prompts.items()}
    for seq in sequences.values():
        scheduler.add(seq)
    while (plan := scheduled(scheduler, proposer)) is not None:
        sampled = {}
        for entry in plan.sequences:
            seq, start = entry.seq, entry.start_position
            table = entry.block_table
            # Every earlier position holds the sequence's own token: no rejected token was ever kept.
            for position in range(start):
                slot = table[position // BLOCK] * BLOCK + position % BLOCK
                assert slots[slot] == seq.token_slice(position, position + 1)[0]
            for slot, token in zip(entry.slot_mapping, entry.token_ids, strict=True):
                slots[slot] = token
            if entry.sample:
                sampled[seq.seq_id] = verified(seq, entry)
        scheduler.on_step_done(plan, sampled)
    for i, seq in sequences.items():
        assert seq.output_ids == reference(prompts[i], seq.max_new_tokens)
    assert scheduler.num_blocks_used == 0
    assert scheduler.num_preemptions and scheduler.prefix_hit_tokens  # both happened among the proposals


def test_draft_proposals_reserve_slots_and_roll_back_like_token_proposals():
    """A proposer giving a count: the entry is `draft`, its token_ids the last token alone, its slots and
    blocks cover the proposals (capped by max_new_tokens); the kept tokens count as computed, the rest
    roll back."""
    scheduler = Scheduler(SchedulerConfig(num_blocks=8, block_size=BLOCK))
    seq = Sequence(1, [1, 2, 3], max_new_tokens=6)
    scheduler.add(seq)
    scheduler.on_step_done(scheduler.schedule(), {1: 4})
    plan = scheduled(scheduler, lambda s: 3)
    (entry,) = plan.sequences
    assert (entry.draft, entry.num_proposed, entry.token_ids) == (True, 3, [4])
    assert entry.slot_mapping == seq.block_table.slot_mapping(3, 4) and len(entry.block_table) == 2
    assert plan.num_decode_tokens == 4
    assert scheduler.extend_decode(plan, 8) == 1
    scheduler.on_step_done(plan, {1: [5, 6]})  # one proposal kept, then the token after it
    assert seq.output_ids == [4, 5, 6] and seq.num_computed == 5
    assert len(seq.block_table.blocks) == 2
    plan = scheduled(scheduler, lambda s: 5)
    assert plan.sequences[0].num_proposed == 2  # three more tokens may be output
    scheduler.on_step_done(plan, {1: [7, 8, 9]})
    assert seq.output_ids == [4, 5, 6, 7, 8, 9]
    assert scheduler.num_blocks_used == 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_speculating_run_counts_every_token_a_step_gains(prefix_caching):
    """A multi-step run whose entries speculate: the shards answer each step with one to k + 1 tokens within
    the positions extend_decode grew; each counts as computed, the next step starts after them, and the
    blocks and the prefix cache hold only computed positions."""
    scheduler = Scheduler(SchedulerConfig(num_blocks=16, block_size=BLOCK, enable_prefix_caching=prefix_caching))
    prompt = [3, 5, 1]
    seq = Sequence(1, list(prompt), max_new_tokens=40)
    scheduler.add(seq)
    scheduler.on_step_done(scheduler.schedule(), {1: true_next(prompt)})
    plan = scheduler.schedule()
    budget = scheduler.extend_decode(plan, 12)
    assert budget == 12
    start = plan.sequences[0].start_position
    assert len(seq.block_table.blocks) == -(-(start + budget) // BLOCK)
    plan.sequences[0].speculate = 3
    gains = iter([4, 1, 3, 4])  # tokens per step, as the shards' verification kept them (12 in all)
    while True:
        (entry,) = plan.sequences
        assert (entry.speculate, entry.token_ids, entry.start_position) == (3, [seq.output_ids[-1]], seq.num_computed)
        known = seq.prompt_ids + seq.output_ids
        tokens = []
        for _ in range(next(gains)):
            tokens.append(true_next(known + tokens))
        scheduler.on_step_done(plan, {1: tokens})
        assert seq.num_computed == len(known) + len(tokens) - 1  # its token and the accepted proposals
        if seq.num_computed + 1 > start + budget:
            break
        plan = scheduler.continue_decode(plan)
    assert seq.output_ids == reference(prompt, len(seq.output_ids)) and len(seq.output_ids) == 13
    if prefix_caching:
        assert scheduler.allocator.num_cached == seq.num_computed // BLOCK
    scheduler.finish(1)
    assert scheduler.num_blocks_used == 0


def test_a_speculating_run_gives_each_sequence_its_own_budget():
    """With own budgets the run's bound is the most any sequence has left (within max_steps), and each entry's
    run_tokens, and the positions its table covers, are its own; without, every sequence has the least."""
    for own in (False, True):
        scheduler = Scheduler(SchedulerConfig(num_blocks=32, block_size=BLOCK))
        seqs = [Sequence(1, [3, 5, 1], max_new_tokens=6), Sequence(2, [2, 7, 4], max_new_tokens=40)]
        for seq in seqs:
            scheduler.add(seq)
        scheduler.on_step_done(scheduler.schedule(), {1: 8, 2: 9})
        plan = scheduler.schedule()
        steps = scheduler.extend_decode(plan, 12, own_budgets=own)
        budgets = [e.run_tokens for e in plan.sequences]
        covered = [len(seq.block_table.blocks) * BLOCK for seq in seqs]
        assert (steps, budgets) == ((12, [5, 12]) if own else (5, [0, 0]))
        assert covered == ([8, 16] if own else [8, 8])  # positions 3 .. 3 + budget - 1
        scheduler.finish(1)
        scheduler.finish(2)
        assert scheduler.num_blocks_used == 0
