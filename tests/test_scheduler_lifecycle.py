"""A request's way through the scheduler's API: what `add` refuses, `abort` and `finish` freeing blocks
wherever the sequence is (waiting, prefilling, decoding, or between `schedule` and `on_step_done`),
and one step in flight at a time (tests/scheduler_harness.py checks the blocks after every step)."""

import pytest
from scheduler_harness import Harness, new_seq, reference_output

from mixserve.router.step_plan import Sequence, SequenceStatus, StepPlan


def test_add_rejects_what_can_never_run() -> None:
    h = Harness(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        h.scheduler.add(new_seq(1, 10, 8))
    with pytest.raises(ValueError, match="empty prompt"):
        h.scheduler.add(Sequence(seq_id=2, prompt_ids=[], max_new_tokens=1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        h.scheduler.add(new_seq(3, 4, 0))
    h.scheduler.add(new_seq(4, 4, 1))
    with pytest.raises(ValueError, match="already"):
        h.scheduler.add(new_seq(4, 4, 1))
    done = h.scheduler.abort(4)
    with pytest.raises(ValueError, match="not a new sequence"):
        h.scheduler.add(done)
    assert h.scheduler.num_waiting == 0


def test_abort_frees_blocks_at_once_wherever_the_sequence_is() -> None:
    h = Harness(num_blocks=64, block_size=4, max_batch_prefill_tokens=8)
    decoding = h.add(new_seq(1, 5, 50))
    h.step()
    prefilling = h.add(new_seq(2, 30, 5))
    h.step()
    waiting = h.add(new_seq(3, 4, 5))
    assert 0 < prefilling.num_computed < 30 and waiting.status is SequenceStatus.WAITING

    used = h.scheduler.num_blocks_used
    assert h.abort(2) is prefilling
    assert h.scheduler.num_blocks_used == used - 2 and prefilling.status is SequenceStatus.FINISHED
    assert h.abort(2) is None
    assert h.abort(3) is waiting and h.scheduler.num_waiting == 0
    assert h.scheduler.finish(1) is decoding
    assert h.scheduler.finish(1) is None and h.abort(99) is None
    assert (h.scheduler.num_running, h.scheduler.num_waiting, h.scheduler.num_blocks_used) == (0, 0, 0)
    h.check_blocks()
    assert h.schedule() is None


def test_abort_between_schedule_and_step_done_is_safe() -> None:
    h = Harness(num_blocks=16, block_size=4)
    kept, aborted = h.add(new_seq(1, 6, 3)), h.add(new_seq(2, 6, 3))
    plan = h.schedule()
    sampled = h.shard.run(plan)
    h.abort(2)
    assert h.scheduler.num_blocks_used == 2
    # The id is reused at once; the old step's results must reach neither sequence.
    reused = h.add(new_seq(2, 6, 3))
    assert h.complete(plan, sampled) == []
    assert aborted.output_ids == [] and aborted.status is SequenceStatus.FINISHED
    assert reused.output_ids == [] and reused.num_computed == 0
    assert kept.output_ids == reference_output(kept.prompt_ids, 1)
    h.run_all()
    h.assert_complete(aborted={2})
    assert reused.output_ids == reference_output(reused.prompt_ids, 3)


def test_one_step_in_flight_and_missing_tokens_change_nothing() -> None:
    h = Harness()
    seqs = [h.add(new_seq(1, 6, 2)), h.add(new_seq(2, 6, 2))]
    plan = h.schedule()
    with pytest.raises(RuntimeError, match="in flight"):
        h.scheduler.schedule()
    with pytest.raises(ValueError, match="not the step in flight"):
        h.scheduler.on_step_done(StepPlan(), {})
    sampled = h.shard.run(plan)
    with pytest.raises(ValueError, match=r"no sampled token for seqs \[2\]"):
        h.scheduler.on_step_done(plan, {1: sampled[1]})
    assert [seq.num_computed for seq in seqs] == [0, 0] and seqs[0].output_ids == []
    h.complete(plan, sampled)
    # A failed step is dropped by aborting its sequences first.
    plan = h.schedule()
    h.abort(1)
    h.abort(2)
    assert h.complete(plan, {}) == []
    assert h.schedule() is None and h.scheduler.num_blocks_used == 0
