"""The harness the scheduler's tests drive: the continuous-batching scheduler and a fake shard that
keeps a real paged cache.

The fake shard's "K/V" at a position is a running hash of every token up to it: writing a token
reads the previous position's hash back through the block table, as attention reads the past, and
the sampled token comes from the last position's hash. A wrong slot, a stale block or a shared block
that another prefix led to therefore changes the outputs, which are compared with the same hash run
over the plain token list; reading a sequence back also checks every position's hash against its
tokens. The fake shard keeps each sequence's penalty history the way the real runner does, so a
sequence admitted past position 0 (a prefix cache hit) must bring the tokens it skipped. The harness
models the waiting queue as one FIFO per priority (arrivals at the back of theirs, preempted sequences
at the front), checks that every admission takes the head of the best non-empty one, that a step which
preempted admitted only sequences better than every one it preempted, and checks the blocks' reference
counts after every step.
"""

from collections import Counter, defaultdict, deque

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


def new_seq(seq_id: int, prompt_len: int, max_new_tokens: int, priority: int = 0) -> Sequence:
    prompt = [(seq_id * 7 + i * 3) % 1000 for i in range(prompt_len)]
    return Sequence(seq_id=seq_id, prompt_ids=prompt, max_new_tokens=max_new_tokens, priority=priority)


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
        self.queues: defaultdict[int, deque[int]] = defaultdict(deque)  # priority -> its FIFO of seq ids
        self.plans: list[StepPlan] = []

    def add(self, seq: Sequence) -> Sequence:
        self.scheduler.add(seq)
        self.seqs.append(seq)
        self.queues[seq.priority].append(seq.seq_id)
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        seq = self.scheduler.abort(seq_id)
        for queue in self.queues.values():
            if seq_id in queue:
                queue.remove(seq_id)
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
            self.queues[seq.priority].appendleft(seq.seq_id)
        for entry in plan.sequences:
            if entry.seq.seq_id in admitted:
                head = self.queues[min(p for p, queue in self.queues.items() if queue)].popleft()
                assert head == entry.seq.seq_id, "admission out of priority and FIFO order"
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
        if plan.preempted and admitted:
            best_victim = min(seq.priority for seq in plan.preempted)
            worst_admitted = max(seq.priority for seq in self.seqs if seq.seq_id in admitted)
            assert worst_admitted < best_victim, "a step that preempted admitted a sequence no better than a victim"
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
        assert self.scheduler.num_waiting == sum(len(queue) for queue in self.queues.values())
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
