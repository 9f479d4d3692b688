"""Priority scheduling (vLLM's `priority`, lower first): the waiting queue's order, a better head preempting
worse running sequences in the step that admits it, decode preemption taking the worst priority first,
and equal priorities behaving as first come, first served (tests/scheduler_harness.py checks every
admission against its model of one FIFO per priority, and the outputs at the end)."""

from scheduler_harness import Harness, new_seq

from mixserve.router.step_plan import Sequence, SequenceStatus
from mixserve.router.waiting_queue import WaitingQueue


def test_waiting_queue_orders_by_priority_then_arrival_and_preempted_first():
    queue = WaitingQueue()
    seqs = {
        name: Sequence(i, [1], 1, priority=p) for i, (name, p) in enumerate([("a", 1), ("b", 0), ("c", 1), ("d", -1)])
    }
    for name in "abcd":
        queue.push_back(seqs[name])
    assert [s.seq_id for s in queue] == [3, 1, 0, 2]  # d, b, a, c
    victim = Sequence(9, [1], 1, priority=1)
    queue.push_front(victim)  # ahead of a and c, behind every better class
    later = Sequence(10, [1], 1, priority=1)
    queue.push_front(later)  # a victim pushed after another goes ahead of it
    assert [s.seq_id for s in queue] == [3, 1, 10, 9, 0, 2]
    queue.remove(seqs["b"])
    assert queue.pop_head() is seqs["d"] and queue.head.seq_id == 10 and len(queue) == 4


def test_admission_follows_priority_then_arrival():
    h = Harness(num_blocks=32, block_size=4, max_running_requests=1)
    for seq_id, priority in [(1, 0), (2, 2), (3, 1), (4, 1), (5, 0)]:
        h.add(new_seq(seq_id, 3, 2, priority=priority))
    plans = h.run_all()
    admitted = [e.seq.seq_id for p in plans for e in p.sequences if e.is_prefill]
    assert admitted == [1, 5, 3, 4, 2]
    assert h.scheduler.num_preemptions == 0
    h.assert_complete()


def test_a_better_request_preempts_a_worse_one_and_runs_in_the_same_step():
    h = Harness(num_blocks=32, block_size=4, max_running_requests=2)
    low = [h.add(new_seq(seq_id, 4, 20, priority=5)) for seq_id in (1, 2)]
    h.step()
    h.step()
    assert all(seq.status is SequenceStatus.RUNNING for seq in low)
    waiting_low = h.add(new_seq(3, 4, 2, priority=5))
    high = h.add(new_seq(4, 4, 3, priority=0))
    plan = h.step()
    # The last admitted of the worst priority makes room; the better request is admitted at once.
    assert [seq.seq_id for seq in plan.preempted] == [2]
    assert [e.seq.seq_id for e in plan.sequences] == [1, 4]
    assert high.status is SequenceStatus.RUNNING and low[1].status is SequenceStatus.WAITING
    # The victim keeps its place ahead of the worse request that arrived after it.
    while high.status is not SequenceStatus.FINISHED:
        h.step()
    plan = h.step()
    assert [e.seq.seq_id for e in plan.sequences if e.is_prefill] == [2]
    assert waiting_low.status is SequenceStatus.WAITING
    h.run_all()
    h.assert_complete()


def test_equal_priorities_never_preempt_for_admission():
    h = Harness(num_blocks=32, block_size=4, max_running_requests=1)
    first = h.add(new_seq(1, 4, 6, priority=3))
    h.step()
    second = h.add(new_seq(2, 4, 2, priority=3))
    worse = h.add(new_seq(3, 4, 2, priority=4))
    while first.status is not SequenceStatus.FINISHED:
        plan = h.step()
        assert not plan.preempted and [e.seq for e in plan.sequences] == [first]
    assert second.status is SequenceStatus.WAITING and worse.status is SequenceStatus.WAITING
    h.run_all()
    assert h.scheduler.num_preemptions == 0
    h.assert_complete()


def test_a_better_request_preempts_for_blocks():
    # 6 blocks of 4: a worse sequence holds 4 of them; the better one's prompt needs 3.
    h = Harness(num_blocks=6, block_size=4)
    worse = h.add(new_seq(1, 15, 8, priority=1))
    h.step()
    better = h.add(new_seq(2, 12, 2, priority=0))
    plan = h.step()
    assert [seq.seq_id for seq in plan.preempted] == [1]
    assert [e.seq for e in plan.sequences] == [better]
    assert worse.status is SequenceStatus.WAITING
    h.run_all()
    h.assert_complete()


def test_decode_preemption_takes_the_worst_priority_first():
    # 5 blocks of 4: the worse sequence is admitted first; when the decodes need a block, it is the
    # victim, though the better one is the younger.
    h = Harness(num_blocks=5, block_size=4, enable_prefix_caching=False)
    worse = h.add(new_seq(1, 4, 12, priority=2))
    h.step()
    better = h.add(new_seq(2, 4, 12, priority=1))
    plans = h.run_all()
    preempted = [seq for plan in plans for seq in plan.preempted]
    assert preempted and all(seq is worse for seq in preempted)
    assert better.output_ids and worse.output_ids
    h.assert_complete()


def test_no_preemption_that_cannot_make_room():
    # 6 blocks of 4: a better sequence holds 3 and takes a 4th for its first decode, a worse one holds 1.
    # A middle request needing 3 blocks could not fit even with the worse one gone, so the worse one keeps
    # running; the middle one waits for the room the better one leaves.
    h = Harness(num_blocks=6, block_size=4, enable_prefix_caching=False)
    best = h.add(new_seq(1, 12, 4, priority=0))
    worst = h.add(new_seq(2, 3, 4, priority=2))
    h.step()
    middle = h.add(new_seq(3, 12, 2, priority=1))
    while best.status is not SequenceStatus.FINISHED:
        plan = h.step()
        assert not plan.preempted and middle.status is SequenceStatus.WAITING
    h.run_all()
    assert h.scheduler.num_preemptions == 0 and worst.output_ids
    h.assert_complete()
