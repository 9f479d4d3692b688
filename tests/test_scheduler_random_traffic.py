"""The scheduler under random traffic (a hypothesis state machine): arrivals sharing prefixes, random
lengths and priorities, aborts (also mid-step) and steps against a tight cache, with and without prefix caching;
tests/scheduler_harness.py checks every step, the blocks after it, and every output at the end."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from scheduler_harness import Harness, new_seq

from mixserve.router.step_plan import Sequence

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
        priority=st.sampled_from([0, 0, 0, -1, 1, 2]),
    )
    def arrive(self, prefix: list[int], prefix_len: int, suffix_len: int, max_new_tokens: int, priority: int) -> None:
        seq_id = len(self.h.seqs)
        suffix = new_seq(seq_id, suffix_len, max_new_tokens).prompt_ids
        prompt = prefix[:prefix_len] + suffix
        seq = Sequence(seq_id=seq_id, prompt_ids=prompt, max_new_tokens=max_new_tokens, priority=priority)
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
