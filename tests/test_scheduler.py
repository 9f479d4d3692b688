"""The continuous-batching scheduler, driven by a fake shard that keeps a real paged cache.

The fake shard's "K/V" at a position is a running hash of every token up to it: writing a token
reads the previous position's hash back through the block table, as attention reads the past, and
the sampled token comes from the last position's hash. A wrong slot, a stale block or a shared block
that another prefix led to therefore changes the outputs, which are compared with the same hash run
over the plain token list; reading a sequence back also checks every position's hash against its
tokens. The fake shard keeps each sequence's penalty history the way the real runner does, so a
sequence admitted past position 0 (a prefix cache hit) must bring the tokens it skipped. The harness
models the waiting queue (arrivals at the back, preempted sequences at the front), checks that every
admission takes the head of it, and checks the blocks' reference counts after every step.
"""

from collections import Counter, deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mixserve.router.scheduler import Scheduler, SchedulerConfig
from mixserve.router.step_plan import ScheduledSequence, Sequence, SequenceStatus, StepPlan

ROOT = 17


def extend_hash(h: int, token: int) -> int:
    """The fake K/V of a position: the previous position's (ROOT before position 0) and its token."""
    return (h * 31 + token) % 1_000_003


def next_token(history: list[int]) -> int:
    """The fake model: a hash of every token so far."""
    h = ROOT
    for token in history:
        h = extend_hash(h, token)
    return h % 1000


def reference_output(prompt: list[int], max_new_tokens: int) -> list[int]:
    history = list(prompt)
    for _ in range(max_new_tokens):
        history.append(next_token(history))
    return history[len(prompt) :]


def new_seq(seq_id: int, prompt_len: int, max_new_tokens: int) -> Sequence:
    prompt = [(seq_id * 7 + i * 3) % 1000 for i in range(prompt_len)]
    return Sequence(seq_id=seq_id, prompt_ids=prompt, max_new_tokens=max_new_tokens)


class FakeShard:
    """A paged cache of (writer seq_id, position, token, hash) per slot, written and read like the shards'."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.block_size = config.block_size
        self.sharing = config.enable_prefix_caching
        self.cache: list[tuple[int, int, int, int] | None] = [None] * (config.num_blocks * config.block_size)
        # Tokens of positions [0, len) each live sequence has fed, as the runner's penalty history has them.
        self.histories: dict[int, list[int]] = {}

    def read(self, entry: ScheduledSequence, position: int) -> tuple[int, int]:
        """(token, hash) at `position` of entry's sequence, through its block table."""
        block = entry.block_table[position // self.block_size]
        written = self.cache[block * self.block_size + position % self.block_size]
        seq_id = entry.seq.seq_id
        assert written is not None, f"seq {seq_id} read position {position} from a slot never written"
        owner, written_position, token, h = written
        assert written_position == position, f"seq {seq_id} read position {position} from {written_position}'s slot"
        assert owner == seq_id or self.sharing, f"seq {seq_id} read position {position} written by seq {owner}"
        return token, h

    def run(self, plan: StepPlan) -> dict[int, int]:
        sampled = {}
        for entry in plan.sequences:
            seq_id, start = entry.seq.seq_id, entry.start_position
            self.feed_history(entry)
            positions = range(start, start + len(entry.token_ids))
            for position, slot, token in zip(positions, entry.slot_mapping, entry.token_ids, strict=True):
                previous = self.read(entry, position - 1)[1] if position else ROOT
                self.cache[slot] = (seq_id, position, token, extend_hash(previous, token))
            if entry.sample:
                history, h = [], ROOT
                for position in range(start + len(entry.token_ids)):
                    token, stored = self.read(entry, position)
                    h = extend_hash(h, token)
                    assert stored == h, f"seq {seq_id} position {position} holds K/V of another prefix"
                    history.append(token)
                assert self.histories[seq_id] == history, f"seq {seq_id}'s penalty history is not its tokens"
                sampled[seq_id] = h % 1000
                self.histories[seq_id].append(sampled[seq_id])
        return sampled

    def feed_history(self, entry: ScheduledSequence) -> None:
        """What the runner does with a step's tokens: add those past what the sequence has fed."""
        history = self.histories.setdefault(entry.seq.seq_id, [])
        start = entry.start_position
        if entry.prefix_token_ids:
            assert len(entry.prefix_token_ids) == start
            history.extend(entry.prefix_token_ids[len(history) :])
        assert len(history) >= start, f"seq {entry.seq.seq_id} starts at {start} but fed only {len(history)} tokens"
        history.extend(entry.token_ids[len(history) - start :])

    def release(self, seq_id: int) -> None:
        self.histories.pop(seq_id, None)


class Harness:
    """A scheduler, a fake shard, every sequence ever added, and a model of the waiting queue."""

    def __init__(self, num_blocks: int = 64, block_size: int = 4, **config: int | bool | None) -> None:
        self.config = SchedulerConfig(num_blocks=num_blocks, block_size=block_size, **config)
        self.scheduler = Scheduler(self.config)
        self.shard = FakeShard(self.config)
        self.seqs: list[Sequence] = []
        self.queue: deque[int] = deque()
        self.plans: list[StepPlan] = []

    def add(self, seq: Sequence) -> Sequence:
        self.scheduler.add(seq)
        self.seqs.append(seq)
        self.queue.append(seq.seq_id)
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        seq = self.scheduler.abort(seq_id)
        if seq_id in self.queue:
            self.queue.remove(seq_id)
        self.shard.release(seq_id)
        return seq

    def schedule(self) -> StepPlan | None:
        running = {seq.seq_id for seq in self.seqs if seq.status is SequenceStatus.RUNNING}
        plan = self.scheduler.schedule()
        if plan is None:
            assert self.scheduler.num_running == self.scheduler.num_waiting == 0, "idle with work left"
            return None
        admitted = {entry.seq.seq_id for entry in plan.sequences} - running
        self.check_plan(plan, admitted)
        for seq in plan.preempted:
            self.queue.appendleft(seq.seq_id)
        for entry in plan.sequences:
            if entry.seq.seq_id in admitted:
                assert self.queue.popleft() == entry.seq.seq_id, "admission out of FIFO order"
        self.plans.append(plan)
        return plan

    def complete(self, plan: StepPlan, sampled: dict[int, int]) -> list[Sequence]:
        finished = self.scheduler.on_step_done(plan, sampled)
        for seq in finished:
            assert seq.status is SequenceStatus.FINISHED and len(seq.output_ids) == seq.max_new_tokens
            self.shard.release(seq.seq_id)
        self.check_blocks()
        return finished

    def step(self) -> StepPlan | None:
        plan = self.schedule()
        if plan is not None:
            self.complete(plan, self.shard.run(plan))
        return plan

    def run_all(self) -> list[StepPlan]:
        start = len(self.plans)
        for _ in range(10_000):
            if self.step() is None:
                return self.plans[start:]
        raise AssertionError("did not finish in 10000 steps")

    def check_plan(self, plan: StepPlan, admitted: set[int]) -> None:
        """Everything a step promises the shards, checked before the step runs."""
        config, block_size, allocator = self.config, self.config.block_size, self.scheduler.allocator
        seq_ids = [entry.seq.seq_id for entry in plan.sequences]
        assert len(set(seq_ids)) == len(seq_ids)
        assert 0 < len(plan.sequences) <= config.max_running_requests
        assert plan.num_prefill_tokens <= config.max_batch_prefill_tokens
        assert plan.num_prefill_tokens == sum(len(e.token_ids) for e in plan.sequences if e.is_prefill)
        assert plan.num_decode_tokens == sum(1 for e in plan.sequences if not e.is_prefill)
        assert [e.is_prefill for e in plan.sequences] == sorted(e.is_prefill for e in plan.sequences)
        if plan.preempted:
            assert not admitted, "admitted in a step that preempted"
        for entry in plan.sequences:
            seq, start, n = entry.seq, entry.start_position, len(entry.token_ids)
            assert seq.status is SequenceStatus.RUNNING
            assert start == seq.num_computed and n >= 1
            assert entry.token_ids == (seq.prompt_ids + seq.output_ids)[start : start + n]
            if seq.seq_id in admitted:
                assert entry.is_prefill and start % block_size == 0, "a cache hit covers whole blocks"
                assert entry.prefix_token_ids == (seq.prompt_ids + seq.output_ids)[:start]
                assert start == 0 or config.enable_prefix_caching
            else:
                assert entry.prefix_token_ids == []
            assert entry.sample == (start + n == seq.num_tokens)
            if not entry.is_prefill:
                assert n == 1 and entry.sample and entry.token_ids == [seq.output_ids[-1]]
            assert entry.block_table == seq.block_table.blocks
            assert len(entry.block_table) == -(-(start + n) // block_size)
            own_slots = {b * block_size + o for b in entry.block_table for o in range(block_size)}
            for position, slot in zip(range(start, start + n), entry.slot_mapping, strict=True):
                assert slot == entry.block_table[position // block_size] * block_size + position % block_size
                assert slot in own_slots
                assert allocator.ref_count(slot // block_size) == 1, f"seq {seq.seq_id} writes a shared block"

    def check_blocks(self) -> None:
        """Reference counts are the holders, only full computed blocks are shared, and none is lost."""
        scheduler, allocator, block_size = self.scheduler, self.scheduler.allocator, self.config.block_size
        holders: Counter[int] = Counter()
        running = [seq for seq in self.seqs if seq.status is SequenceStatus.RUNNING]
        for seq in self.seqs:
            blocks = seq.block_table.blocks
            if seq.status is SequenceStatus.RUNNING:
                assert blocks and len(set(blocks)) == len(blocks)
                holders.update(blocks)
            else:
                assert blocks == []
        assert [allocator.ref_count(b) for b in range(self.config.num_blocks)] == [
            holders[b] for b in range(self.config.num_blocks)
        ]
        for seq in running:
            for index, block in enumerate(seq.block_table.blocks):
                if holders[block] > 1:
                    assert (index + 1) * block_size <= seq.num_computed, "a shared block is not full and computed"
        if not self.config.enable_prefix_caching:
            assert max(holders.values(), default=0) <= 1 and allocator.num_cached == 0
        assert len(holders) == scheduler.num_blocks_used
        assert allocator.num_used + allocator.num_free == self.config.num_blocks
        assert scheduler.num_blocks_used + scheduler.num_blocks_free <= self.config.max_blocks
        assert 0 <= scheduler.prefix_hit_tokens <= scheduler.prefix_query_tokens
        assert self.scheduler.num_running == len(running)
        assert self.scheduler.num_waiting == len(self.queue)
        # The no-deadlock argument rests on this: prompts never hold blocks against each other.
        assert sum(not seq.is_decoding for seq in running) <= 1

    def assert_complete(self, aborted: set[int] = frozenset()) -> None:
        for seq in self.seqs:
            assert seq.status is SequenceStatus.FINISHED
            expected = reference_output(seq.prompt_ids, seq.max_new_tokens)
            if seq.seq_id in aborted:
                assert seq.output_ids == expected[: len(seq.output_ids)]
            else:
                assert seq.output_ids == expected
        assert self.scheduler.num_blocks_used == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_blocks": 0},
        {"block_size": 0},
        {"max_batch_prefill_tokens": 0},
        {"max_running_requests": 0},
        {"max_batch_total_tokens": 3},
    ],
)
def test_config_is_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**{"num_blocks": 8, "block_size": 4, **kwargs})


def test_one_request_prefills_then_decodes() -> None:
    h = Harness(num_blocks=8, block_size=4)
    seq = h.add(new_seq(1, prompt_len=10, max_new_tokens=4))
    plans = h.run_all()
    assert [(p.num_prefill_tokens, p.num_decode_tokens) for p in plans] == [(10, 0), (0, 1), (0, 1), (0, 1)]
    prefill = plans[0].sequences[0]
    assert prefill.sample and prefill.is_prefill and prefill.start_position == 0
    assert prefill.slot_mapping == [b * 4 + o for b in prefill.block_table for o in range(4)][:10]
    # The first token comes from the prefill; each decode feeds the one before it.
    assert [p.sequences[0].token_ids for p in plans[1:]] == [[t] for t in seq.output_ids[:3]]
    assert [p.sequences[0].start_position for p in plans[1:]] == [10, 11, 12]
    h.assert_complete()


def test_long_prompt_is_chunked_while_running_sequences_keep_decoding() -> None:
    h = Harness(num_blocks=64, block_size=4, max_batch_prefill_tokens=8)
    streaming = h.add(new_seq(1, prompt_len=4, max_new_tokens=20))
    h.step()
    long = h.add(new_seq(2, prompt_len=30, max_new_tokens=2))
    chunks = []
    while long.num_computed < len(long.prompt_ids):
        plan = h.step()
        assert [e.seq for e in plan.sequences if not e.is_prefill] == [streaming]
        (chunk,) = [e for e in plan.sequences if e.is_prefill]
        chunks.append((chunk.start_position, len(chunk.token_ids), chunk.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]
    assert len(long.output_ids) == 1
    h.run_all()
    h.assert_complete()


def test_running_prefills_go_before_admissions_and_admission_is_fifo() -> None:
    h = Harness(num_blocks=64, block_size=4, max_batch_prefill_tokens=8)
    for seq_id, prompt_len in [(1, 20), (2, 5), (3, 3)]:
        h.add(new_seq(seq_id, prompt_len, 2))
    plans = h.run_all()
    shape = [[(e.seq.seq_id, len(e.token_ids)) for e in p.sequences] for p in plans[:4]]
    assert shape == [
        [(1, 8)],
        [(1, 8)],
        [(1, 4), (2, 4)],
        [(1, 1), (2, 1), (3, 3)],
    ]
    h.assert_complete()


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


def test_max_batch_total_tokens_caps_the_blocks_in_use() -> None:
    h = Harness(num_blocks=100, block_size=4, max_batch_total_tokens=18)
    assert h.config.max_blocks == 4 and h.scheduler.num_blocks_free == 4
    assert not h.scheduler.fits(10, 8)
    for seq_id in range(5):
        h.add(new_seq(seq_id, 6, 8))
    h.run_all()  # check_blocks asserts used + free <= 4 after every step
    assert h.scheduler.num_preemptions > 0
    h.assert_complete()


def test_max_running_requests_caps_the_batch() -> None:
    h = Harness(max_running_requests=2)
    for seq_id in range(5):
        h.add(new_seq(seq_id, 3, 4))
    for plan in h.run_all():
        assert len(plan.sequences) <= 2
    h.assert_complete()


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


# Prompts of the random traffic start with a slice of one of these, so they share prefixes. The third
# shares the first's second half after a different first half: equal blocks after different prefixes
# must not be shared.
SHARED_PREFIXES = [
    [(5 * i) % 997 for i in range(32)],
    [(5 * i) % 997 for i in range(12)] + [500 + i for i in range(20)],
    [900 + i for i in range(16)] + [(5 * i) % 997 for i in range(16, 32)],
]


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals sharing prefixes, lengths, aborts (also mid-step) and steps against a tight cache."""

    @initialize(
        block_size=st.sampled_from([1, 2, 3, 4, 16]),
        num_blocks=st.integers(1, 24),
        max_batch_prefill_tokens=st.integers(1, 40),
        max_running_requests=st.integers(1, 6),
        total_blocks=st.none() | st.integers(1, 24),
        prefix_caching=st.booleans(),
    )
    def setup(
        self,
        block_size: int,
        num_blocks: int,
        max_batch_prefill_tokens: int,
        max_running_requests: int,
        total_blocks: int | None,
        prefix_caching: bool,
    ) -> None:
        self.h = Harness(
            num_blocks=num_blocks,
            block_size=block_size,
            max_batch_prefill_tokens=max_batch_prefill_tokens,
            max_running_requests=max_running_requests,
            max_batch_total_tokens=None if total_blocks is None else total_blocks * block_size,
            enable_prefix_caching=prefix_caching,
        )
        self.aborted: set[int] = set()

    @rule(
        prefix=st.sampled_from(SHARED_PREFIXES),
        prefix_len=st.integers(0, 32),
        suffix_len=st.integers(0, 12),
        max_new_tokens=st.integers(1, 12),
    )
    def arrive(self, prefix: list[int], prefix_len: int, suffix_len: int, max_new_tokens: int) -> None:
        seq_id = len(self.h.seqs)
        suffix = new_seq(seq_id, suffix_len, max_new_tokens).prompt_ids
        seq = Sequence(seq_id=seq_id, prompt_ids=prefix[:prefix_len] + suffix, max_new_tokens=max_new_tokens)
        prompt_len = len(seq.prompt_ids)
        if prompt_len and self.h.scheduler.fits(prompt_len, max_new_tokens):
            self.h.add(seq)
        else:
            with pytest.raises(ValueError):
                self.h.scheduler.add(seq)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        if self.h.seqs:
            seq = data.draw(st.sampled_from(self.h.seqs))
            if self.h.abort(seq.seq_id) is not None:
                self.aborted.add(seq.seq_id)

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        plan = self.h.schedule()
        if plan is None:
            return
        sampled = self.h.shard.run(plan)
        if data.draw(st.booleans()):
            victim = data.draw(st.sampled_from(plan.sequences)).seq
            self.h.abort(victim.seq_id)
            self.aborted.add(victim.seq_id)
        self.h.complete(plan, sampled)

    @invariant()
    def blocks_are_conserved(self) -> None:
        if hasattr(self, "h"):
            self.h.check_blocks()

    def teardown(self) -> None:
        if hasattr(self, "h"):
            self.h.run_all()
            self.h.assert_complete(self.aborted)


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_scheduler_under_random_traffic = SchedulerMachine.TestCase
