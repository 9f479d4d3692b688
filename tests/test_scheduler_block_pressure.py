"""The scheduler short of KV blocks: a request waits without being overtaken, the youngest sequence is
preempted and recomputed with the same outputs, a prompt chunk shrinks to the free blocks, an exact fit
uses the whole cache, and `max_batch_total_tokens` caps the blocks in use (tests/scheduler_harness.py
checks the waiting queue and the blocks' reference counts after every step)."""

from scheduler_harness import Harness, new_seq

from mixserve.router.step_plan import SequenceStatus


def test_request_waits_while_blocks_are_short_without_being_overtaken() -> None:
    # 4 blocks of 4 tokens. The first request grows to 3 blocks; the second needs 3 for its prompt
    # and must wait; the third would fit in the one free block but must not jump the queue.
    h = Harness(num_blocks=4, block_size=4)
    first, second, third = h.add(new_seq(1, 8, 4)), h.add(new_seq(2, 12, 1)), h.add(new_seq(3, 2, 1))
    while first.status is not SequenceStatus.FINISHED:
        plan = h.step()
        assert [e.seq for e in plan.sequences] == [first]
        if first.status is not SequenceStatus.FINISHED:
            assert (second.status, third.status) == (SequenceStatus.WAITING, SequenceStatus.WAITING)
            assert h.scheduler.num_waiting == 2
    plan = h.step()
    assert [e.seq for e in plan.sequences] == [second, third]
    h.run_all()
    assert h.scheduler.num_preemptions == 0
    h.assert_complete()


def test_preemption_under_block_pressure_finishes_everything_with_the_same_outputs() -> None:
    # 6 blocks of 4 tokens hold 24 tokens; four requests each want up to 16. Without prefix caching a
    # preempted sequence recomputes everything.
    h = Harness(num_blocks=6, block_size=4, enable_prefix_caching=False)
    for seq_id in range(4):
        h.add(new_seq(seq_id, 5, 12))
    plans = h.run_all()  # the harness checks preempted sequences are readmitted first
    assert h.scheduler.num_preemptions > 0
    preempted = [seq for plan in plans for seq in plan.preempted]
    assert preempted and all(seq.seq_id != 0 for seq in preempted), "the oldest is never preempted"
    # A preempted sequence comes back recomputing its prompt and what it had generated.
    recomputes = [e for p in plans for e in p.sequences if e.start_position == 0 and e.seq in preempted]
    assert any(len(e.token_ids) > len(e.seq.prompt_ids) for e in recomputes)
    h.assert_complete()


def test_prompt_chunk_short_of_blocks_shrinks_waits_and_yields_to_decodes() -> None:
    # 5 blocks of 4 tokens. B's 14-token prompt is admitted with an 8-token chunk next to A's decodes;
    # its next chunk shrinks to the one free block, then it waits with no room while A decodes, and
    # when A's decode needs a block B, the youngest, is preempted.
    h = Harness(num_blocks=5, block_size=4, max_batch_prefill_tokens=8)
    h.add(new_seq(1, 4, 10))
    h.step()
    h.add(new_seq(2, 14, 2))
    plans = h.run_all()
    shapes = [[(e.seq.seq_id, e.start_position, len(e.token_ids)) for e in p.sequences] for p in plans[:5]]
    assert shapes == [[(1, 4, 1), (2, 0, 8)], [(1, 5, 1), (2, 8, 4)], [(1, 6, 1)], [(1, 7, 1)], [(1, 8, 1)]]
    assert [[seq.seq_id for seq in p.preempted] for p in plans[:5]] == [[], [], [], [], [2]]
    h.assert_complete()


def test_exact_fit_uses_the_whole_cache() -> None:
    h = Harness(num_blocks=4, block_size=4)
    assert h.scheduler.fits(10, 7)  # 16 tokens of K/V: the last sampled token is never written
    assert not h.scheduler.fits(10, 8)
    h.add(new_seq(1, 10, 7))
    h.run_all()
    h.assert_complete()


def test_max_batch_total_tokens_caps_the_blocks_in_use() -> None:
    h = Harness(num_blocks=100, block_size=4, max_batch_total_tokens=18)
    assert h.config.max_blocks == 4 and h.scheduler.num_blocks_free == 4
    assert not h.scheduler.fits(10, 8)
    for seq_id in range(5):
        h.add(new_seq(seq_id, 6, 8))
    h.run_all()  # check_blocks asserts used + free <= 4 after every step
    assert h.scheduler.num_preemptions > 0
    h.assert_complete()
