"""One request in flight: its limits, the token events its client reads, and its text state.

A `Generation` is created by the engine when it admits a request; the engine feeds it tokens and
ends it, the HTTP/gRPC handlers read its events. Limits are the admission limits of the flags.
"""

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mixserve_pb import shard_pb2
from router.detokenizer import IncrementalDetokenizer
from router.errors import DeadlineExceeded, RouterError
from router.params import GenerationParams
from router.stop_sequences import StopSequenceMatcher

if TYPE_CHECKING:
    from router.engine import Engine

log = logging.getLogger("mixserve.router")

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


@dataclass(slots=True)
class Limits:
    """Admission limits (flags of the same names)."""

    max_concurrent_requests: int = 128
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    # Seconds from admission to the last token (--request-timeout); 0 is no deadline.
    request_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_input_tokens < self.max_total_tokens:
            raise ValueError(
                f"need 1 <= max_input_tokens ({self.max_input_tokens}) < max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if not self.request_timeout_s >= 0:
            raise ValueError(f"request_timeout_s must be >= 0, got {self.request_timeout_s}")


class Generation:
    """A live request: its sequence, its text state, and the queue its client reads events from."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: GenerationParams, engine: "Engine") -> None:
        self.id = f"req-{seq_id}"
        self.seq_id = seq_id
        self.prompt_ids = prompt_ids
        if params.grammar is not None and not params.grammar.grammar:
            raise ValueError("compile the grammar (router.structured.compile_grammar) before submitting")
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.detokenizer = IncrementalDetokenizer(engine.tokenizer, prompt_ids)
        self.stops = StopSequenceMatcher(params.stop)
        self.events: asyncio.Queue[TokenEvent | RouterError] = asyncio.Queue()
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.done = False
        timeout_s = engine.limits.request_timeout_s
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self._engine = engine

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated_tokens(self) -> int:
        return len(self.output_ids)

    def sampling_proto(self) -> shard_pb2.SamplingParams:
        p = self.params
        return shard_pb2.SamplingParams(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            seed=self.seed,
            top_n_tokens=p.top_n_tokens,
            grammar=p.grammar.grammar if p.grammar is not None else "",
        )

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """The request's events until its last; raises the request's error if it fails.

        Leaving the iteration early (client gone) cancels the request.
        """
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, RouterError):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not self.done:
                self._engine.cancel(self)

    def cancel(self) -> None:
        """End the request now (its client went away); its KV blocks are freed."""
        self._engine.cancel(self)

    async def _next_event(self) -> "TokenEvent | RouterError":
        """The next event, or DeadlineExceeded once the request has run past --request-timeout."""
        if self.deadline is None:
            return await self.events.get()
        try:
            # A deadline already past must not let a queued event through (a get() that does not wait
            # would never see the timeout fire).
            if self.deadline <= time.monotonic():
                raise TimeoutError
            async with asyncio.timeout(self.deadline - time.monotonic()):
                return await self.events.get()
        except TimeoutError:
            timeout_s = self._engine.limits.request_timeout_s
            generated = self.generated_tokens
            log.info("event=deadline_exceeded id=%s generated=%d timeout_s=%g", self.id, generated, timeout_s)
            return DeadlineExceeded(f"the request ran past its {timeout_s:g} s deadline after {generated} tokens")
