"""The one interface between the fronts (HTTP, gRPC) and the engine behind them.

A front validates a request (router/validation.py), hands its prompt ids to `EngineAPI.submit`, and
reads the `GenerationHandle` it gets back; `/info`, `/health`, gRPC ModelInfo and health read
`stats()` and `health()`. Nothing else of the engine (its scheduler, its shard groups, the wire
format) is a front's business. `router.replicas.Replicas` implements it, over one shard group or many.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mixserve.router.errors import ShardUnavailable
from mixserve.router.metrics import Metrics
from mixserve.router.params import GenerationParams

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"


@dataclass(slots=True)
class TokenEvent:
    """One generated token as a client sees it; `finish_reason` is set on the last one."""

    token_id: int
    text: str
    logprob: float
    special: bool
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(slots=True)
class Limits:
    """Admission limits (flags of the same names)."""

    max_concurrent_requests: int = 128
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    # Seconds from admission to the last token (--request-timeout); 0 is no deadline.
    request_timeout_s: float = 0.0
    # --scheduling-policy: "fcfs" (every request's priority must be 0) or "priority" (vLLM's, lower first).
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if not 1 <= self.max_input_tokens < self.max_total_tokens:
            raise ValueError(
                f"need 1 <= max_input_tokens ({self.max_input_tokens}) < max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if not self.request_timeout_s >= 0:
            raise ValueError(f"request_timeout_s must be >= 0, got {self.request_timeout_s}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")


@dataclass(slots=True, frozen=True)
class GroupStats:
    """One shard group: serving or down (and why), its load and its counters."""

    group: int
    error: str | None  # None while serving
    restarting: bool  # down, and a restart is coming
    restarts: int
    last_failure: str | None  # why the group last failed, None if it never did
    num_shard: int
    requests_routed: int
    requests_waiting: int
    requests_running: int
    kv_blocks_total: int
    kv_blocks_free: int
    steps: int
    generated_tokens: int
    # What a decode step cost the shards by batch size, plain and speculating (µs, the median of the latest; None: not
    # measured): (batch, plain, speculating), for speculation's cost back-off.
    speculation_step_us: tuple[tuple[int, float | None, float | None], ...] = ()


@dataclass(slots=True, frozen=True)
class EngineStats:
    """What the engine is and holds now: its limits, its batching and KV cache geometry, live
    counters summed over its shard groups, and each group's own."""

    limits: Limits
    eos_token_ids: tuple[int, ...]
    block_size: int
    # KV blocks one sequence may hold (the smallest group's batch capacity): what "fits" means.
    max_sequence_blocks: int
    max_batch_prefill_tokens: int
    # --max-batch-total-tokens; None: the whole cache.
    max_batch_total_tokens: int | None
    max_batch_size: int
    prefix_caching: bool
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int
    requests_waiting: int
    requests_running: int
    steps: int
    step_sequences: int
    generated_tokens: int
    cancelled_requests: int
    # --speculate (0: off); tokens proposed and accepted since start.
    speculate: int
    speculative_proposed_tokens: int
    speculative_accepted_tokens: int
    groups: tuple[GroupStats, ...]

    @property
    def max_sequence_tokens(self) -> int:
        """Tokens of K/V one sequence may hold."""
        return self.max_sequence_blocks * self.block_size


@dataclass(slots=True, frozen=True)
class HealthReport:
    """The engine's health as probed now: `unavailable` when no group can serve (the error requests
    get, with Retry-After while a restart is coming), else the groups down (by group, why)."""

    unavailable: ShardUnavailable | None
    groups_down: dict[int, str]
    num_groups: int


class GenerationHandle(Protocol):
    """A request the engine admitted, as its front reads it."""

    id: str
    prompt_ids: list[int]
    seed: int
    finish_reason: str | None
    # Scored prompt tokens (params.prompt_logprobs), filled as the prefill runs; None at position 0.
    prompt_logprobs: list[float | None]
    # With top_n_tokens too: each prompt position's top alternatives, (token id, logprob); empty at 0.
    prompt_top_tokens: list[list[tuple[int, float]]]
    prompt_ranks: list[int]  # each prompt token's rank at its position (1: the most likely; 0 at 0)

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def generated_tokens(self) -> int: ...

    @property
    def speculative_proposed(self) -> int:
        """Tokens proposed for this request by speculation (0 without it)."""
        ...

    @property
    def speculative_accepted(self) -> int:
        """Proposed tokens that became output."""
        ...

    def stream(self) -> AsyncIterator[TokenEvent]:
        """The request's token events until its last; raises its RouterError. Leaving early cancels it."""
        ...


@runtime_checkable
class EngineAPI(Protocol):
    """What every front may use of the engine."""

    tokenizer: Any  # a transformers fast tokenizer
    special_ids: frozenset[int]
    metrics: Metrics  # the router's registry (the fronts count their requests in it)

    @property
    def serving(self) -> bool:
        """Whether a shard group serves now (no probe: the engine's own view)."""
        ...

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> GenerationHandle:
        """Queue a validated request; raises Overloaded or ShardUnavailable."""
        ...

    def cancel(self, generation: GenerationHandle) -> None:
        """End a request now (its client went away)."""
        ...

    async def health(self) -> HealthReport:
        """Probe every serving shard group."""
        ...

    def stats(self) -> EngineStats:
        """Limits, geometry and live counters, read now."""
        ...
