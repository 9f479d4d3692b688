"""Multi-step decode in the scheduler: `extend_decode` / `continue_decode` against the fake paged shard.

A run of n steps is driven as the engine drives it: the first step is the scheduled plan, each later
one `continue_decode`; requests arrive, are cancelled and finish mid-run. A sequence cancelled
mid-run keeps being computed by the shards until the run stops, so the fake shard keeps writing its
"ghost" tokens into the blocks it had; the test checks no live sequence holds those blocks meanwhile.
"""

import random

import pytest
from scheduler_harness import Harness, new_seq, reference_output

from mixserve.router.step_plan import Sequence


def decode_everything(h: Harness) -> None:
    """Plain steps until no running sequence is mid-prefill."""
    while any(not s.is_decoding for s in h.scheduler._running):
        h.step()


def test_a_run_is_refused_while_anything_waits_or_prefills():
    h = Harness(num_blocks=64, block_size=4, max_running_requests=2)
    for i in range(3):
        h.add(new_seq(i, 5, 20))
    plan = h.schedule()  # two prefills admitted, one waits
    assert h.scheduler.extend_decode(plan, 8) == 1
    h.complete(plan, h.shard.run(plan))
    plan = h.schedule()
    assert plan.num_prefill_tokens == 0 and h.scheduler.num_waiting == 1
    assert h.scheduler.extend_decode(plan, 8) == 1


def test_a_run_is_bounded_by_max_new_tokens_and_free_blocks():
    h = Harness(num_blocks=64, block_size=4)
    h.add(new_seq(1, 6, 5))
    h.step()  # prefill; 4 tokens left to generate
    plan = h.schedule()
    assert h.scheduler.extend_decode(plan, 16) == 4

    h = Harness(num_blocks=6, block_size=4)
    h.add(new_seq(1, 6, 11))
    h.add(new_seq(2, 6, 11))
    h.step()  # both prefilled: 2 blocks each held, 2 free
    plan = h.schedule()
    steps = h.scheduler.extend_decode(plan, 32)
    assert steps == 12 - 6  # one more block each: positions 6..11
    assert all(e.block_table == e.seq.block_table.blocks for e in plan.sequences)
    assert h.scheduler.num_blocks_free == 0


def run(h: Harness, plan, steps: int, rng: random.Random, arrivals: list[Sequence]):
    """One multi-step run of `steps`, with cancellations, arrivals and ghost writes as described above;
    its last step's plan."""
    ghosts = []  # (entry, next position) of sequences cancelled mid-run
    for k in range(steps):
        if k:
            plan = h.scheduler.continue_decode(plan)
        live_blocks = {b for s in h.seqs if s.block_table for b in s.block_table.blocks}
        for entry, position in ghosts:
            block = entry.block_table[position // h.config.block_size]
            assert block not in live_blocks, "a cancelled sequence's ghost write lands in a live block"
        ghosts = [(entry, position + 1) for entry, position in ghosts]
        h.complete(plan, h.shard.run(plan))
        if not plan.sequences and not ghosts:
            return plan  # everything the run computes is gone: the engine interrupts it
        if plan.sequences and rng.random() < 0.2:
            victim = rng.choice(plan.sequences)
            if h.abort(victim.seq.seq_id) is not None:
                ghosts.append((victim, victim.start_position + 1))
        if arrivals and rng.random() < 0.3:
            h.add(arrivals.pop())
        if rng.random() < 0.1:
            return plan  # interrupted: the shards stop after this step
    return plan


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_runs_give_the_tokens_of_single_steps(seed, prefix_caching):
    rng = random.Random(seed)
    h = Harness(num_blocks=48, block_size=4, max_batch_prefill_tokens=16, enable_prefix_caching=prefix_caching)
    seqs = [new_seq(i, rng.randint(1, 12), rng.randint(1, 30)) for i in range(12)]
    if prefix_caching:
        for s in seqs[::2]:
            s.prompt_ids[:8] = seqs[0].prompt_ids[:8] + [0] * max(0, 8 - len(seqs[0].prompt_ids))
    for s in seqs[:6]:
        h.add(s)
    arrivals = seqs[6:]
    for _ in range(2000):
        plan = h.schedule()
        if plan is None:
            if not arrivals:
                break
            h.add(arrivals.pop())
            continue
        steps = h.scheduler.extend_decode(plan, rng.choice([1, 4, 8]))
        assert steps >= 1
        for entry in plan.sequences:
            covered = len(entry.block_table) * h.config.block_size
            assert covered >= entry.start_position + steps, "the run's positions are outside the block table"
        last = run(h, plan, steps, rng, arrivals)
        if steps > 1:
            h.scheduler.end_run(last)
            for s in h.scheduler._running:
                if s.is_decoding:  # holds the blocks of its computed positions, none reserved past them
                    assert len(s.block_table.blocks) == -(-s.num_computed // h.config.block_size)
    else:
        raise AssertionError("did not finish")
    assert h.scheduler.num_blocks_used == 0
    for s in h.seqs:
        if s.output_ids and len(s.output_ids) == s.max_new_tokens:
            assert s.output_ids == reference_output(s.prompt_ids, s.max_new_tokens)
        else:
            assert s.output_ids == reference_output(s.prompt_ids, s.max_new_tokens)[: len(s.output_ids)]


def test_continue_decode_refuses_a_run_past_its_blocks():
    h = Harness(num_blocks=64, block_size=4)
    h.add(new_seq(1, 4, 40))
    h.step()
    plan = h.schedule()
    assert h.scheduler.extend_decode(plan, 4) == 4  # positions 4..7: the second block
    for k in range(4):
        if k:
            plan = h.scheduler.continue_decode(plan)
        h.complete(plan, h.shard.run(plan))
    with pytest.raises(ValueError, match="past the blocks"):
        h.scheduler.continue_decode(plan)  # position 8 needs a third block, never granted


def test_end_run_gives_back_the_blocks_an_interrupted_run_did_not_reach():
    h = Harness(num_blocks=64, block_size=4)
    seq = new_seq(1, 6, 40)
    h.add(seq)
    h.step()  # prefill: positions 0..5, 2 blocks
    plan = h.schedule()
    assert h.scheduler.extend_decode(plan, 16) == 16
    assert h.scheduler.num_blocks_used == 6  # positions up to 21 reserved
    for k in range(4):  # interrupted after 4 of its 16 steps
        if k:
            plan = h.scheduler.continue_decode(plan)
        if k == 3:
            with pytest.raises(RuntimeError, match="in flight"):
                h.scheduler.end_run(plan)  # not before its last step is answered
        h.complete(plan, h.shard.run(plan))
    h.scheduler.end_run(plan)
    assert seq.num_computed == 10 and h.scheduler.num_blocks_used == 3
    while seq.status.name == "RUNNING":  # the following steps grow the table again as they need
        h.step()
    assert seq.output_ids == reference_output(seq.prompt_ids, 40)
    assert h.scheduler.num_blocks_used == 0
