"""What the scheduler plans over: each request's `Sequence` (its tokens, how many are in the KV cache, its
block table) and each step's `StepPlan`, a `ScheduledSequence` per sequence, which the engine turns into
the shard protocol's SequenceSteps. Pure Python: no torch, no I/O."""

import enum
from dataclasses import dataclass, field
from typing import Any

from mixserve.router.block_allocator import BlockTable
from mixserve.router.prefix_cache import BlockHash


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued (new or preempted), in the running batch, or done for good."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One request as the scheduler sees it; `payload` belongs to the caller and is never read here."""

    seq_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    payload: Any = None
    # vLLM's request priority: lower runs earlier (router/waiting_queue.py); 0 for every request under fcfs.
    priority: int = 0
    # Never admitted from the prefix cache: every prompt token is computed (the request scores its prompt).
    compute_prompt: bool = False
    # The parent of its first block's hash: None, or a cache salt's root (prefix_cache.salted_root), which
    # keeps its cached blocks apart from every other salt's and from unsalted ones.
    hash_root: BlockHash | None = field(default=None, repr=False)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens (prompt, then outputs) whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    # None until Scheduler.add binds it to the cache's block size.
    block_table: BlockTable | None = field(default=None, repr=False)
    # Chained hashes of the sequence's first full blocks, computed as they are needed; the tokens of
    # a sequence never change (outputs only append), so they outlive preemption.
    block_hashes: list[BlockHash] = field(default_factory=list, repr=False)
    # The scheduler's: its place in the waiting queue's class, and the order of its latest admission.
    queue_order: int = field(default=0, repr=False)
    admission: int = field(default=0, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def table(self) -> BlockTable:
        """The block table the scheduler bound when it added the sequence."""
        assert self.block_table is not None, "every sequence the scheduler holds was bound by add"
        return self.block_table

    @property
    def is_decoding(self) -> bool:
        """Whether only the last sampled token is missing from the cache: the next step is a decode."""
        return bool(self.output_ids) and self.num_computed == self.num_tokens - 1

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the prompt followed by the generated tokens."""
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len : end - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt_len]


@dataclass(slots=True)
class ScheduledSequence:
    """What one sequence does in a step; maps onto the shard protocol's SequenceStep."""

    seq: Sequence
    token_ids: list[int]
    start_position: int  # position of token_ids[0]; every earlier position is in the cache
    slot_mapping: list[int]  # cache slot written for each of token_ids
    block_table: list[int]  # blocks holding positions [0, start_position + len(token_ids))
    sample: bool  # decodes and last prefill chunks sample; earlier chunks only fill the cache
    is_prefill: bool
    # Tokens [0, start_position), set only on the step that admits a sequence past position 0 (its
    # prefix came from the prefix cache): a shard new to the sequence never saw them.
    prefix_token_ids: list[int] = field(default_factory=list)
    # Speculative decoding: the last num_proposed of token_ids are proposals the shards verify; with
    # `draft`, the shards' draft model makes them, and token_ids is the last token alone.
    num_proposed: int = 0
    draft: bool = False
    # In a multi-step run: the most tokens the shards propose before each step (0: none), and, set by
    # `extend_decode` with own budgets, the most tokens the sequence gains in it (0: the run's steps).
    speculate: int = 0
    run_tokens: int = 0


@dataclass(slots=True)
class StepPlan:
    """One step: decodes first, then prefill chunks, plus the sequences preempted to make room."""

    sequences: list[ScheduledSequence] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # Sent back to the waiting queue by this step; the shards may drop their per-sequence state.
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens
