"""Lookahead slots: a decode's block table grown past its next token before the shards write there, for
the steps of a multi-step run (`reserve_run`) or a step's speculative proposals (`reserve_proposals`).
The scheduler calls these on the step it has just planned.

Speculative decoding. `Scheduler.add_proposals` takes a proposer: once a step is planned (and only if it
preempted nothing), each decode may carry proposed tokens after its last one, as many as the free
blocks hold and at most `max_new_tokens` allows. A proposer that gives a number instead of tokens
leaves them to the shards (their n-gram lookup or draft model): the entry is `draft`, its slots cover
the proposals, its token_ids do not. The shards keep the proposals their sampler agrees
with; `on_step_done` then counts only the kept positions as computed, gives back the tail blocks
holding nothing else (a length change, since the router owns the tables), and registers in the
prefix cache only blocks filled with kept tokens. A step with proposals is a single step. A
multi-step run speculates otherwise: its entries' `speculate` lets the shards propose before each of
its steps within the positions `extend_decode` grew, so a step's sequence may gain several tokens,
each counted as computed (the blocks past them stay the sequence's, for its next steps).
Pure Python: no torch, no I/O.
"""

from collections.abc import Callable

from mixserve.router.block_allocator import BlockAllocator
from mixserve.router.step_plan import Sequence, StepPlan


def reserve_run(plan: StepPlan, max_steps: int, own_budgets: bool, allocator: BlockAllocator, free_blocks: int) -> int:
    """How many decode steps in a row `plan`, all decodes, may run (at most `max_steps`, bounded by each
    sequence's remaining `max_new_tokens` and by `free_blocks`); grows the block tables for them, and with
    `own_budgets` sets each entry's `run_tokens` (Scheduler.extend_decode says how)."""
    left = [e.seq.max_new_tokens - len(e.seq.output_ids) for e in plan.sequences]
    steps = min(max_steps, max(left) if own_budgets else min(left))
    while steps > 1:
        # The last step's sampled token is never fed back: a run of n steps writes n positions.
        needed = sum(
            e.seq.table.blocks_needed(e.start_position + min(steps, n))
            for e, n in zip(plan.sequences, left, strict=True)
        )
        if needed <= free_blocks:
            break
        steps -= 1
    if steps > 1:
        for entry, n in zip(plan.sequences, left, strict=True):
            table = entry.seq.table
            table.grow(allocator, entry.start_position + min(steps, n))
            entry.block_table = list(table.blocks)
            if own_budgets:
                entry.run_tokens = min(steps, n)
    return steps


def reserve_proposals(
    plan: StepPlan,
    propose: Callable[[Sequence], list[int] | int],
    allocator: BlockAllocator,
    free_blocks: Callable[[], int],
) -> None:
    """Extend the plan's decodes with the proposals that fit (Scheduler.add_proposals says how);
    `free_blocks` gives the blocks the batch may still take, fewer after each decode's table grows."""
    size = allocator.block_size
    for entry in plan.sequences:
        seq = entry.seq
        if entry.is_prefill:
            continue
        table = seq.table
        # Every token kept is an output: the step may gain at most the tokens max_new_tokens leaves.
        room = min(
            seq.max_new_tokens - len(seq.output_ids) - 1,
            (len(table.blocks) + free_blocks()) * size - seq.num_computed - 1,
        )
        if room < 1:
            continue
        proposed = propose(seq)
        drafted = isinstance(proposed, int)
        count = min(proposed if drafted else len(proposed), room)
        if count < 1:
            continue
        table.grow(allocator, seq.num_computed + 1 + count)
        if not drafted:
            entry.token_ids = entry.token_ids + proposed[:count]
        entry.slot_mapping = table.slot_mapping(seq.num_computed, 1 + count)
        entry.block_table = list(table.blocks)
        entry.num_proposed = count
        entry.draft = drafted
        plan.num_decode_tokens += count
