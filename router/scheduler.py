"""Continuous batching over the router-owned paged KV cache, with chunked prefill.

Every step (`schedule`) is built in this order:

1. one decode token for every running sequence whose prompt is already in the cache;
2. the next prompt chunk of every partially prefilled running sequence, oldest first;
3. waiting sequences, strictly in queue order, each with its first chunk, while the prefill token
   budget, `max_running_requests` and free blocks allow. A head that cannot get its blocks waits, and
   the requests behind it wait with it.

The queue is first come, first served within a priority class (router/waiting_queue.py: vLLM's
`priority`, lower first; every request's is 0 unless the router runs `--scheduling-policy priority`),
and the running batch is kept in the same order: by priority, then by admission. Before planning, a
waiting head that outranks the worst running sequence and finds no running slot or too few blocks
preempts running sequences of a worse priority, worst first, until it fits (vLLM's priority
preemption; not where even all of theirs would leave it short); it is then admitted in that step,
unless prompt chunks already took the prefill budget. With one class none of that happens.

Prefill chunks share `max_batch_prefill_tokens`; decode tokens do not count against it, so a long
prompt is spread over several steps and never stalls the running streams.

Blocks are reserved only for the tokens a step processes, not for `max_new_tokens` up front, so many
requests share the cache and a request that stops early never held memory it did not use. The price
is that the cache can run out mid-generation: a decode that needs a block when none is free preempts
the last running sequence in that order, the most recently admitted of the worst priority (possibly
itself). The victim's blocks are freed and it goes back to the head of its class in the waiting queue;
when admitted again it recomputes its prompt and the
tokens it has generated as one prefill (vLLM's recompute preemption), so nothing it produced is lost.
No step admits anything after its decodes preempted: memory is short, and a new sequence would be the
next victim.

Why this never deadlocks. A decode short of a block preempts the last running sequences, itself
last, so the first decoding sequence always gets its token. At most one prompt is partially
prefilled at any time (it takes the prefill budget before admission, and admission stops when the
budget or the blocks run out), so prompts never hold blocks against each other: a prompt chunk that
finds no room waits for the decoding sequences, which progress every step and free their blocks
when they finish (or preempt it, if it is the youngest); nothing is admitted meanwhile. `add` only
takes requests that fit the cache alone, so the waiting head runs at the latest when the batch
drains. No request is lost: a preempted sequence keeps its outputs and its place at the queue head.

Prefix caching (on by default) starts an admitted sequence past the cached full blocks it begins with
(router/prefix_blocks.py). Speculative proposals and the steps of a multi-step run take slots past a
decode's next token, reserved once the step is planned (router/lookahead.py).

One step is in flight at a time: `schedule`, the shards run the plan, `on_step_done`. `finish` and
`abort` may come at any moment and free blocks at once; blocks freed while a step is in flight are
handed out again only by the next `schedule`, whose step the shards run after the current one; a
block a step writes is registered only after it, so no step can share a block an earlier one is
still writing. Pure Python: no torch, no I/O.
"""

import bisect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mixserve.router.block_allocator import BlockAllocator, BlockTable
from mixserve.router.lookahead import reserve_proposals, reserve_run
from mixserve.router.prefix_blocks import cache_filled_blocks, cached_prefix
from mixserve.router.step_plan import ScheduledSequence, Sequence, SequenceStatus, StepPlan
from mixserve.router.waiting_queue import WaitingQueue

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SchedulerConfig:
    """Cache geometry (from the shards' Warmup) and the batching limits (from the router's flags)."""

    num_blocks: int
    block_size: int
    max_batch_prefill_tokens: int = 4096
    # Tokens of K/V the running batch may hold, rounded down to whole blocks; None: the whole cache.
    max_batch_total_tokens: int | None = None
    max_running_requests: int = 256
    # Share cached full blocks of earlier prompts (vLLM's automatic prefix caching).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_batch_prefill_tokens", "max_running_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_total_tokens is not None and self.max_batch_total_tokens < self.block_size:
            raise ValueError(
                f"max_batch_total_tokens ({self.max_batch_total_tokens}) must hold at least one block "
                f"of {self.block_size} tokens"
            )

    @property
    def max_blocks(self) -> int:
        """Blocks the running batch may hold at once."""
        if self.max_batch_total_tokens is None:
            return self.num_blocks
        return min(self.num_blocks, self.max_batch_total_tokens // self.block_size)


def running_key(seq: Sequence) -> tuple[int, int]:
    return seq.priority, seq.admission


class Scheduler:
    """Continuous-batching scheduler: the waiting queue, the running batch and the block allocator."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.allocator = BlockAllocator(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.num_preemptions = 0
        # Tokens of admitted sequences looked up in the prefix cache, and those found there.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self._waiting = WaitingQueue()
        self._running: list[Sequence] = []  # by priority, then admission order, best first
        self._admissions = 0
        self._live: dict[int, Sequence] = {}
        self._in_flight: StepPlan | None = None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_blocks_used(self) -> int:
        return self.allocator.num_used

    @property
    def num_blocks_free(self) -> int:
        return self._free_blocks()

    @property
    def num_blocks_cached(self) -> int:
        """Blocks findable in the prefix cache, held or evictable."""
        return self.allocator.num_cached

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether a request of this size could ever run, alone in the cache."""
        # The last sampled token is never fed back, so a sequence holds at most
        # prompt_len + max_new_tokens - 1 tokens of K/V, also while recomputing after a preemption.
        max_tokens = prompt_len + max_new_tokens - 1
        return -(-max_tokens // self.config.block_size) <= self.config.max_blocks

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the back of its priority class; ValueError if it can never run."""
        if seq.status is not SequenceStatus.WAITING or seq.num_computed or seq.output_ids:
            raise ValueError(f"seq {seq.seq_id} is not a new sequence")
        if seq.seq_id in self._live:
            raise ValueError(f"seq {seq.seq_id} is already queued or running")
        if not seq.prompt_ids:
            raise ValueError(f"seq {seq.seq_id} has an empty prompt")
        if seq.max_new_tokens < 1:
            raise ValueError(f"seq {seq.seq_id}: max_new_tokens must be >= 1, got {seq.max_new_tokens}")
        if not self.fits(len(seq.prompt_ids), seq.max_new_tokens):
            raise ValueError(
                f"seq {seq.seq_id}: {len(seq.prompt_ids)} prompt tokens + {seq.max_new_tokens} new tokens "
                f"exceed the KV cache ({self.config.max_blocks} blocks of {self.config.block_size})"
            )
        seq.block_table = BlockTable(self.config.block_size)
        self._live[seq.seq_id] = seq
        self._waiting.push_back(seq)

    def schedule(self) -> StepPlan | None:
        """Build the next step, or None when there is nothing to run; call on_step_done before the next."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() called before on_step_done() for the step in flight")
        plan = StepPlan()
        self._preempt_for_priority(plan)
        made_room = len(plan.preempted)
        self._schedule_decodes(plan)
        budget = self._schedule_prefill_chunks(plan)
        # A step whose decodes had to preempt is short of memory: admitting now would only preempt again.
        if len(plan.preempted) == made_room:
            self._admit(plan, budget)
        if not plan.sequences:
            return None
        self._in_flight = plan
        return plan

    def on_step_done(self, plan: StepPlan, sampled: Mapping[int, int | list[int]]) -> list[Sequence]:
        """Record a finished step: `sampled` maps seq_id to the token sampled for it (for a decode with
        proposals, the list of tokens the shards kept: accepted proposals, then the one sampled after).

        Results for sequences finished or aborted since `schedule` are ignored. Returns the sequences
        that reached max_new_tokens; they are finished and their blocks freed. ValueError, changing
        nothing, if a live sequence that had to sample has no token: to drop a failed step, abort its
        sequences first.
        """
        if plan is not self._in_flight:
            raise ValueError("on_step_done() got a plan that is not the step in flight")
        live = [entry for entry in plan.sequences if self._live.get(entry.seq.seq_id) is entry.seq]
        missing = [entry.seq.seq_id for entry in live if entry.sample and entry.seq.seq_id not in sampled]
        if missing:
            raise ValueError(f"no sampled token for seqs {missing}")
        self._in_flight = None
        finished: list[Sequence] = []
        for entry in live:
            seq = entry.seq
            tokens = sampled[seq.seq_id] if entry.sample else []
            tokens = [tokens] if isinstance(tokens, int) else tokens
            computed = len(entry.slot_mapping)  # positions, a draft's proposals included
            if entry.num_proposed:
                # The last token and the accepted proposals are in the cache; rejected positions are not.
                computed -= entry.num_proposed - (len(tokens) - 1)
            elif entry.speculate:
                computed = len(tokens)
            seq.num_computed += computed
            seq.output_ids.extend(tokens)
            if entry.num_proposed:
                seq.table.truncate(self.allocator, seq.num_computed)
            if self.allocator.prefix_cache is not None:
                cache_filled_blocks(self.allocator, entry, computed)
            if entry.sample:
                if len(seq.output_ids) >= seq.max_new_tokens:
                    self._remove(seq, "length")
                    finished.append(seq)
        return finished

    def extend_decode(self, plan: StepPlan, max_steps: int, own_budgets: bool = False) -> int:
        """How many decode steps in a row the shards may run for `plan`, just scheduled (multi-step
        decode); grows the block tables for them. 1 unless every entry is a decode and nothing waits.

        Steps are bounded by each sequence's remaining `max_new_tokens` and by the free blocks; the
        plan's block tables then cover every position of every step. With `own_budgets` (a speculating
        run, whose sequences gain tokens at different rates), the bound is the most any sequence has
        left, and each entry's `run_tokens` is its own (what it has left, within that bound), its
        table covering those: a sequence with fewer left than the bound leaves the run when done, the
        others going on. Follow each step after the first with `continue_decode`, which leaves out
        sequences that have ended.
        """
        if self._in_flight is not plan:
            raise ValueError("extend_decode() got a plan that is not the step in flight")
        if max_steps <= 1 or self._waiting or plan.preempted or plan.num_prefill_tokens:
            return 1
        if any(e.num_proposed for e in plan.sequences):
            return 1
        return reserve_run(plan, max_steps, own_budgets, self.allocator, self._free_blocks())

    def continue_decode(self, plan: StepPlan) -> StepPlan:
        """The next step of a multi-step run after `plan` (done): a decode of each sequence of it still
        running, in blocks `extend_decode` already grew. Call on_step_done with it as with a plan."""
        if self._in_flight is not None:
            raise RuntimeError("continue_decode() called before on_step_done() for the step in flight")
        following = StepPlan()
        for entry in plan.sequences:
            seq = entry.seq
            if self._live.get(seq.seq_id) is not seq or seq.status is not SequenceStatus.RUNNING:
                continue
            table = seq.table
            if table.blocks_needed(seq.num_computed + 1):
                raise ValueError(f"seq {seq.seq_id}: the run went past the blocks extend_decode grew")
            self._plan_chunk(following, seq, 1)
            following.sequences[-1].speculate = entry.speculate
        self._in_flight = following
        return following

    def end_run(self, plan: StepPlan) -> None:
        """A multi-step run ended with `plan`, its last step, answered (the shards write nothing more
        for it): give back the blocks `extend_decode` reserved that its sequences did not reach, as
        an interrupted run, or a speculating one whose sequences gained fewer tokens than the most,
        leaves them. The next steps grow the tables again as they need."""
        if self._in_flight is not None:
            raise RuntimeError("end_run() called before on_step_done() for the step in flight")
        for entry in plan.sequences:
            seq = entry.seq
            if self._live.get(seq.seq_id) is seq and seq.status is SequenceStatus.RUNNING:
                seq.table.truncate(self.allocator, seq.num_computed)

    def finish(self, seq_id: int) -> Sequence | None:
        """End a sequence wherever it is and free its blocks; None if it is not queued or running."""
        return self._remove_id(seq_id, "finished")

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancel a sequence (client gone, error) wherever it is, mid-prefill included; like finish."""
        return self._remove_id(seq_id, "aborted")

    def _free_blocks(self) -> int:
        return min(self.allocator.num_free, self.config.max_blocks - self.allocator.num_used)

    def _schedule_decodes(self, plan: StepPlan) -> None:
        for seq in list(self._running):
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue
            while seq.table.blocks_needed(seq.num_computed + 1) > self._free_blocks():
                # Only sequences younger than seq can be behind it, and none of them is planned yet.
                victim = self._running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self._plan_chunk(plan, seq, 1)

    def _schedule_prefill_chunks(self, plan: StepPlan) -> int:
        budget = self.config.max_batch_prefill_tokens
        for seq in self._running:
            if budget == 0:
                break
            if seq.is_decoding:
                continue
            # A chunk short of blocks shrinks to the room left; with none, it waits for the decoding
            # sequences to free theirs (the module docstring says why that always happens).
            n = self._fit_chunk(seq, min(seq.num_tokens - seq.num_computed, budget))
            if n:
                self._plan_chunk(plan, seq, n)
                budget -= n
        return budget

    def _preempt_for_priority(self, plan: StepPlan) -> None:
        """Preempt running sequences of a worse priority than the waiting head, the last in running order
        first, while the head finds no running slot or too few free blocks for its first chunk beside the
        blocks the running decodes take this step; not at all where even every worse sequence's blocks
        would leave it short."""
        if not self._waiting or not self._running or self._waiting.head.priority >= self._running[-1].priority:
            return  # nothing outranked: every step under fcfs
        head = self._waiting.head
        _, _, blocks = self._first_chunk(head, self.config.max_batch_prefill_tokens)

        def decode_blocks(seqs: list[Sequence]) -> int:
            return sum(seq.table.blocks_needed(seq.num_computed + 1) for seq in seqs if seq.is_decoding)

        kept = [seq for seq in self._running if seq.priority <= head.priority]
        worse = self._running[len(kept) :]
        held = sum(self.allocator.ref_count(block) == 1 for seq in worse for block in seq.table.blocks)
        if blocks + decode_blocks(kept) > self._free_blocks() + held:
            return
        while self._running and self._running[-1].priority > head.priority:
            if len(self._running) < self.config.max_running_requests:
                if blocks + decode_blocks(self._running) <= self._free_blocks():
                    return
            self._preempt(self._running[-1], plan)

    def _first_chunk(self, seq: Sequence, budget: int) -> tuple[list[int], int, int]:
        """A waiting sequence's cached prefix blocks, the tokens its first chunk computes within `budget`,
        and the free blocks admitting it takes (a cached block nobody holds counts as free until then)."""
        block_size = self.config.block_size
        cached = cached_prefix(self.allocator, seq)
        num_cached = len(cached) * block_size
        n = min(seq.num_tokens - num_cached, budget)
        new_blocks = -(-(num_cached + n) // block_size) - len(cached)
        revived = sum(self.allocator.ref_count(block) == 0 for block in cached)
        return cached, n, new_blocks + revived

    def _admit(self, plan: StepPlan, budget: int) -> None:
        block_size = self.config.block_size
        while self._waiting and budget > 0 and len(self._running) < self.config.max_running_requests:
            seq = self._waiting.head
            cached, n, blocks = self._first_chunk(seq, budget)
            if blocks > self._free_blocks():
                break
            num_cached = len(cached) * block_size
            self._waiting.pop_head()
            seq.status = SequenceStatus.RUNNING
            seq.admission = self._admissions
            self._admissions += 1
            bisect.insort_right(self._running, seq, key=running_key)
            if self.allocator.prefix_cache is not None:
                seq.table.share(self.allocator, cached)
                seq.num_computed = num_cached
                self.prefix_query_tokens += seq.num_tokens
                self.prefix_hit_tokens += num_cached
            self._plan_chunk(plan, seq, n, admitted=True)
            budget -= n

    def add_proposals(self, plan: StepPlan, propose: Callable[[Sequence], list[int] | int]) -> None:
        """Extend the plan's decodes with the proposals that fit, after everything else has its blocks.

        `propose` gives tokens likely to follow a decoding sequence, or how many the shards should propose;
        each decode carries those the free blocks and its `max_new_tokens` leave room for. Call right after
        `schedule`, not for a plan that preempted (memory is short) nor one `extend_decode` made a run.
        """
        if self._in_flight is not plan or plan.preempted:
            raise ValueError("add_proposals() takes the step just scheduled, which preempted nothing")
        reserve_proposals(plan, propose, self.allocator, self._free_blocks)

    def _fit_chunk(self, seq: Sequence, want: int) -> int:
        """How many of the next `want` tokens of seq its blocks plus the free blocks can hold."""
        room = (len(seq.table.blocks) + self._free_blocks()) * self.config.block_size
        return max(0, min(want, room - seq.num_computed))

    def _plan_chunk(self, plan: StepPlan, seq: Sequence, n: int, admitted: bool = False) -> None:
        start = seq.num_computed
        # A preempted sequence whose cached blocks hold all but its last token is admitted with one
        # token, as a prefill all the same: it joins the batch's prefills and carries its sampling.
        is_prefill = admitted or not seq.is_decoding
        table = seq.table
        table.grow(self.allocator, start + n)
        plan.sequences.append(
            ScheduledSequence(
                seq=seq,
                token_ids=seq.token_slice(start, start + n),
                start_position=start,
                slot_mapping=table.slot_mapping(start, n),
                block_table=list(table.blocks),
                sample=start + n == seq.num_tokens,
                is_prefill=is_prefill,
                prefix_token_ids=seq.token_slice(0, start) if admitted else [],
            )
        )
        if is_prefill:
            plan.num_prefill_tokens += n
        else:
            plan.num_decode_tokens += n

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self._running.remove(seq)
        seq.table.release(self.allocator)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        # Victims are taken last first, so pushing each on the front of its class keeps the class in order.
        self._waiting.push_front(seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1
        logger.debug("event=preempt seq_id=%d generated=%d", seq.seq_id, len(seq.output_ids))

    def _remove_id(self, seq_id: int, reason: str) -> Sequence | None:
        seq = self._live.get(seq_id)
        if seq is not None:
            self._remove(seq, reason)
        return seq

    def _remove(self, seq: Sequence, reason: str) -> None:
        del self._live[seq.seq_id]
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        seq.table.release(self.allocator)
        seq.status = SequenceStatus.FINISHED
        logger.debug("event=seq_removed seq_id=%d reason=%s", seq.seq_id, reason)
