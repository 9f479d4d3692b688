"""One request in flight: the token events its client reads, its text state and its deadline.

A `Generation` is created by the engine when it admits a request; the engine feeds it tokens and
ends it, the HTTP/gRPC handlers read its events (router/engine_api.py's GenerationHandle).
"""

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

from mixserve.router import request_ids
from mixserve.router.detokenizer import IncrementalDetokenizer
from mixserve.router.engine_api import Limits, TokenEvent
from mixserve.router.errors import DeadlineExceeded, RouterError
from mixserve.router.params import GenerationParams
from mixserve.router.speculation import SpeculationState
from mixserve.router.steps import Sampling
from mixserve.router.stop_sequences import StopSequenceMatcher

log = logging.getLogger("mixserve.router")


class Generation:
    """A live request: its sequence, its text state, and the queue its client reads events from."""

    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        params: GenerationParams,
        tokenizer,
        limits: Limits,
        on_cancel: Callable[["Generation"], None],
    ) -> None:
        """`on_cancel` is the engine's: it takes the request out of the batch."""
        self.id = f"req-{seq_id}"
        # The client's own id for it (X-Request-Id), on its log lines: set by the front submitting it.
        self.client_request_id = request_ids.current.get()
        self.seq_id = seq_id
        self.prompt_ids = prompt_ids
        if params.grammar is not None and not params.grammar.grammar:
            raise ValueError("compile the grammar (router.validation) before submitting")
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = StopSequenceMatcher(params.stop, params.include_stop_str_in_output)
        self.events: asyncio.Queue[TokenEvent | RouterError] = asyncio.Queue()
        self.output_ids: list[int] = []
        # With params.prompt_logprobs: each prompt token's log-probability given the ones before (None at 0).
        self.prompt_logprobs: list[float | None] = [None] * len(prompt_ids) if params.prompt_logprobs else []
        # With top_n_tokens too: each prompt position's top alternatives (empty at 0 and until scored).
        self.prompt_top_tokens: list[list[tuple[int, float]]] = (
            [[] for _ in prompt_ids] if params.prompt_logprobs and params.top_n_tokens else []
        )
        # And each prompt token's rank at its position (1: the most likely; 0 at 0 and until scored).
        self.prompt_ranks: list[int] = [0] * len(prompt_ids) if params.prompt_logprobs else []
        self.finish_reason: str | None = None
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.done = False
        self.speculation = SpeculationState()
        self.timeout_s = limits.request_timeout_s
        self.deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        self._on_cancel = on_cancel

    @property
    def request_id_field(self) -> str:
        """What its log lines add for the client's id: ` request_id=ID`, or nothing (router/request_ids.py)."""
        return request_ids.log_field(self.client_request_id)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def speculative_proposed(self) -> int:
        return self.speculation.proposed

    @property
    def speculative_accepted(self) -> int:
        return self.speculation.accepted

    def sampling(self) -> Sampling:
        """How the shards sample this request (its seed drawn at admission when none was given)."""
        p = self.params
        return Sampling(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            seed=self.seed,
            top_n_tokens=p.top_n_tokens,
            grammar=p.grammar.grammar if p.grammar is not None else "",
            typical_p=p.typical_p,
            logit_bias=p.logit_bias,
            min_p=p.min_p,
            allowed_token_ids=p.allowed_token_ids,
            bad_words=p.bad_word_ids,
            prediction_token_ids=p.prediction_ids,
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
                self._on_cancel(self)

    def cancel(self) -> None:
        """End the request now (its client went away); its KV blocks are freed."""
        self._on_cancel(self)

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
            timeout_s = self.timeout_s
            generated = self.generated_tokens
            log.info(
                "event=deadline_exceeded id=%s generated=%d timeout_s=%g%s",
                self.id,
                generated,
                timeout_s,
                self.request_id_field,
            )
            return DeadlineExceeded(f"the request ran past its {timeout_s:g} s deadline after {generated} tokens")
