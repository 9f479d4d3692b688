"""Prefix caching in the scheduler: cached prompt prefixes shared and only the rest computed, blocks
cached once the step that fills them is done, preempted sequences resuming from their cached blocks,
admissions paying for the parked blocks they revive, and the cache off (against the fake paged shard
of tests/scheduler_harness.py, which checks every read against the tokens that led to it)."""

import pytest
from scheduler_harness import Harness

from mixserve.router.prefix_cache import salted_root
from mixserve.router.step_plan import Sequence

PREFIX = list(range(100, 118))  # 4 full blocks of 4 and 2 tokens


def add(h: Harness, seq_id: int, prompt: list[int], max_new_tokens: int) -> Sequence:
    return h.add(Sequence(seq_id=seq_id, prompt_ids=prompt, max_new_tokens=max_new_tokens))


def test_a_cached_prefix_is_shared_and_only_the_rest_is_computed():
    h = Harness(num_blocks=32, block_size=4)
    first = add(h, 1, PREFIX + [1, 2, 3], 3)
    h.step()
    prefix_blocks = first.block_table.blocks[:4]
    h.run_all()
    second = add(h, 2, PREFIX + [7, 8], 3)
    (entry,) = h.step().sequences
    assert (entry.start_position, entry.token_ids) == (16, [116, 117, 7, 8])
    assert entry.prefix_token_ids == PREFIX[:16]
    assert second.block_table.blocks[:4] == prefix_blocks
    assert (h.scheduler.prefix_query_tokens, h.scheduler.prefix_hit_tokens) == (21 + 20, 16)
    h.run_all()
    h.assert_complete()


def test_running_sequences_share_blocks_until_the_last_holder_leaves():
    h = Harness(num_blocks=32, block_size=4)
    first = add(h, 1, PREFIX, 10)
    h.step()
    second = add(h, 2, PREFIX + [5], 10)
    h.step()  # the harness checks every write goes to a block with one holder
    shared = second.block_table.blocks[:4]
    assert shared == first.block_table.blocks[:4]
    assert [h.scheduler.allocator.ref_count(b) for b in shared] == [2, 2, 2, 2]
    h.abort(1)
    assert [h.scheduler.allocator.ref_count(b) for b in shared] == [1, 1, 1, 1]
    h.run_all()
    h.assert_complete(aborted={1})
    assert h.scheduler.num_blocks_used == 0 and h.scheduler.num_blocks_cached >= 4
    assert h.scheduler.num_blocks_free == 32


def test_blocks_are_cached_after_the_step_that_fills_them_not_when_planned():
    h = Harness(num_blocks=32, block_size=4, max_batch_prefill_tokens=10)
    add(h, 1, PREFIX, 2)
    plan = h.schedule()  # positions 0-9: blocks 0 and 1 full, block 2 half
    assert h.scheduler.num_blocks_cached == 0
    h.complete(plan, h.shard.run(plan))
    assert h.scheduler.num_blocks_cached == 2
    # The same prompt admitted while the step that completes blocks 2 and 3 is planned gets only 0 and 1.
    add(h, 2, PREFIX, 2)
    plan = h.step()
    shape = [(e.seq.seq_id, e.start_position, len(e.token_ids)) for e in plan.sequences]
    assert shape == [(1, 10, 8), (2, 8, 2)]
    assert h.scheduler.num_blocks_cached == 4
    h.run_all()
    h.assert_complete()


@pytest.mark.parametrize(("prompt_len", "start"), [(1, 0), (4, 0), (5, 4), (12, 8), (13, 12), (18, 16)])
def test_the_last_token_is_always_computed(prompt_len: int, start: int):
    h = Harness(num_blocks=32, block_size=4)
    add(h, 1, PREFIX, 1)
    h.run_all()
    assert h.scheduler.num_blocks_cached == 4  # the partial fifth block is not cached
    seq = add(h, 2, PREFIX[:prompt_len], 2)
    (entry,) = h.step().sequences
    assert entry.start_position == start and entry.sample
    # The block the sequence computes into is its own, never the cached block of the same tokens.
    assert h.scheduler.allocator.ref_count(seq.block_table.blocks[-1]) == 1
    h.run_all()
    h.assert_complete()


def test_generated_tokens_fill_cached_blocks_too():
    h = Harness(num_blocks=32, block_size=4)
    first = add(h, 1, PREFIX[:6], 4)  # computes 6 prompt + 3 generated tokens: 2 full blocks
    h.run_all()
    assert h.scheduler.num_blocks_cached == 2
    add(h, 2, first.prompt_ids + first.output_ids, 2)
    (entry,) = h.step().sequences
    assert entry.start_position == 8 and entry.token_ids == first.output_ids[2:]
    assert h.scheduler.prefix_hit_tokens == 8
    h.run_all()
    h.assert_complete()


def test_preempted_sequence_resumes_from_its_cached_blocks():
    # 6 blocks of 4; four requests each want up to 16 tokens of K/V, so some are preempted.
    h = Harness(num_blocks=6, block_size=4)
    for seq_id in range(4):
        add(h, seq_id, [(seq_id * 7 + i * 3) % 1000 for i in range(5)], 12)
    plans = h.run_all()
    assert h.scheduler.num_preemptions > 0
    preempted = {seq.seq_id for plan in plans for seq in plan.preempted}
    resumed = [e for p in plans for e in p.sequences if e.seq.seq_id in preempted and e.prefix_token_ids]
    assert resumed, "no preempted sequence found its blocks again"
    h.assert_complete()


def test_preempted_sequence_cached_up_to_its_last_token_comes_back_as_a_prefill():
    # 5 blocks of 4. Both decode in step; at position 8 the older takes the last free block and the
    # younger, short of one, preempts itself with positions 0-7 cached. Readmitted, only its last
    # sampled token is left to compute.
    h = Harness(num_blocks=5, block_size=4, max_batch_prefill_tokens=4)
    add(h, 1, [1, 2, 3, 4], 9)
    younger = add(h, 2, [5, 6, 7, 8], 6)
    plans = h.run_all()
    (preempting,) = [p for p in plans if p.preempted]
    assert preempting.preempted == [younger]
    (resumed,) = [e for p in plans for e in p.sequences if e.seq is younger and e.prefix_token_ids]
    assert (resumed.start_position, resumed.token_ids) == (8, younger.output_ids[4:5])
    assert resumed.is_prefill and resumed.sample
    h.assert_complete()


def test_an_admission_pays_for_the_parked_blocks_it_revives():
    # 5 blocks of 4. A 17-token prompt leaves 4 cached blocks parked and one plain free block; the
    # same prompt again takes the 4 (hit 16) and needs 1 new block: exactly the cache.
    h = Harness(num_blocks=5, block_size=4)
    add(h, 1, PREFIX[:17], 1)
    h.run_all()
    assert h.scheduler.num_blocks_free == 5 and h.scheduler.num_blocks_cached == 4
    add(h, 2, PREFIX[:17], 4)
    (entry,) = h.step().sequences
    assert entry.start_position == 16 and h.scheduler.num_blocks_free == 0
    # A different prompt must wait for blocks: the parked ones are held now, not free.
    add(h, 3, [1, 2, 3], 1)
    plan = h.step()
    assert [e.seq.seq_id for e in plan.sequences] == [2]
    h.run_all()
    h.assert_complete()


def test_max_batch_total_tokens_counts_parked_blocks_as_free():
    h = Harness(num_blocks=20, block_size=4, max_batch_total_tokens=16)
    for seq_id in range(4):
        add(h, seq_id, [seq_id * 50 + i for i in range(9)], 3)
    h.run_all()
    assert h.scheduler.num_blocks_cached == 8 and h.scheduler.num_blocks_free == 4
    h.assert_complete()


def test_disabled_cache_recomputes_everything():
    h = Harness(num_blocks=32, block_size=4, enable_prefix_caching=False)
    add(h, 1, PREFIX, 2)
    h.run_all()
    add(h, 2, PREFIX, 2)
    (entry,) = h.step().sequences
    assert entry.start_position == 0 and entry.prefix_token_ids == []
    assert (h.scheduler.prefix_query_tokens, h.scheduler.prefix_hit_tokens, h.scheduler.num_blocks_cached) == (0, 0, 0)
    h.run_all()
    h.assert_complete()


def test_a_salted_sequence_shares_blocks_only_with_its_own_salt():
    h = Harness(num_blocks=32, block_size=4)
    red, blue = salted_root("red"), salted_root("blue")
    h.add(Sequence(seq_id=1, prompt_ids=PREFIX, max_new_tokens=2, hash_root=red))
    h.run_all()
    for seq_id, root in ((2, blue), (3, None)):  # another salt, and none: misses
        h.add(Sequence(seq_id=seq_id, prompt_ids=PREFIX, max_new_tokens=2, hash_root=root))
        (entry,) = h.step().sequences
        assert entry.start_position == 0
        h.run_all()
    h.add(Sequence(seq_id=4, prompt_ids=PREFIX + [1], max_new_tokens=2, hash_root=red))
    (entry,) = h.step().sequences
    assert entry.start_position == 16  # the same salt: its four full blocks
    h.run_all()
    h.assert_complete()
