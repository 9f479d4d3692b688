"""A step's answer reaching its requests (vLLM's output processor): the prompt log-probabilities its
prefill chunks scored, each sampled token as its request's `TokenEvent` (text delta, stop sequences, EOS
and length decide the end; time to first token and inter-token latency), and the metrics and log lines
of a request's end. The engine keeps the requests, the batch and the step loop.
"""

import logging
import math
import time
from collections.abc import Mapping

from mixserve.router.engine_api import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, TokenEvent
from mixserve.router.generation import Generation
from mixserve.router.metrics import Metrics
from mixserve.router.step_plan import StepPlan
from mixserve.router.steps import SampledToken, StepResult

log = logging.getLogger("mixserve.router")
# Prompts and generated text are the users' data: this logger is silent unless --log-prompts turns it on.
prompt_log = logging.getLogger("mixserve.prompts")
prompt_log.setLevel(logging.CRITICAL + 1)


def keep_prompt_logprobs(plan: StepPlan, result: StepResult, live: Mapping[int, Generation]) -> None:
    """Keep the prompt tokens' log-probabilities (and top alternatives, where asked) the step's prefill
    chunks scored (positions past the prompt, recomputed after a preemption, are the generation's own and
    were reported already)."""
    scored_tokens = [token for token in result.tokens if token.prompt_logprobs]
    if not scored_tokens:
        return
    starts = {entry.seq.seq_id: entry.start_position for entry in plan.sequences}
    for token in scored_tokens:
        generation = live.get(token.seq_id)
        if generation is None or token.seq_id not in starts:
            continue
        scored, tops, ranks = generation.prompt_logprobs, generation.prompt_top_tokens, generation.prompt_ranks
        for position, logprob in enumerate(token.prompt_logprobs, starts[token.seq_id]):
            if 0 < position < len(scored) and not math.isnan(logprob):
                scored[position] = logprob
        for position, rank in enumerate(token.prompt_ranks, starts[token.seq_id]):
            if 0 < position < len(ranks) and rank:
                ranks[position] = rank
        if tops:
            for position, top in enumerate(token.prompt_top_tokens, starts[token.seq_id]):
                if 0 < position < len(tops) and top:
                    tops[position] = top


class OutputProcessor:
    """One engine's sampled tokens as its requests' events, and its requests' ends in the metrics and log."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], special_ids: frozenset[int], metrics: Metrics) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.special_ids = special_ids
        self.metrics = metrics

    def on_token(self, generation: Generation, token: SampledToken, now: float) -> str | None:
        """Hand `token` to its request; the finish reason when it ends the request (the caller ends it)."""
        token_id = token.token_id
        generation.output_ids.append(token_id)
        if generation.first_token_at is None:
            generation.first_token_at = now
            self.metrics.time_to_first_token.observe(now - generation.created)
        else:
            self.metrics.inter_token_latency.observe(now - generation.last_token_at)
        generation.last_token_at = now
        finish = None
        is_eos = token_id in self.eos_token_ids and not generation.params.ignore_eos
        text, stopped = ("", False) if is_eos else generation.stops.feed(generation.detokenizer.add(token_id))
        # A stop token id ends the request after its own text (none for a special token).
        stop_token = not is_eos and token_id in generation.params.stop_token_ids
        if stopped or stop_token:
            finish = FINISH_STOP
        elif is_eos:
            finish = FINISH_EOS
        elif generation.generated_tokens >= generation.params.max_new_tokens:
            finish = FINISH_LENGTH
        if finish is not None and not stopped:
            text += generation.stops.feed(generation.detokenizer.flush())[0] + generation.stops.flush()
        event = TokenEvent(
            token_id=token_id,
            text=text,
            logprob=token.logprob,
            special=token_id in self.special_ids,
            top_tokens=token.top_tokens,
            finish_reason=finish,
        )
        generation.events.put_nowait(event)
        return finish

    def on_end(self, generation: Generation, finish_reason: str | None) -> None:
        """Record a request's end (None: cancelled or failed, counted by the caller) and log its output."""
        if finish_reason is not None:
            now = time.perf_counter()
            first = generation.first_token_at or now
            self.metrics.on_end(finish_reason, now - generation.created)
            log.info(
                "event=finished id=%s prompt_tokens=%d generated=%d finish=%s ttft_ms=%.1f total_ms=%.1f "
                "speculative_proposed=%d speculative_accepted=%d%s",
                generation.id,
                generation.prompt_tokens,
                generation.generated_tokens,
                finish_reason,
                (first - generation.created) * 1000,
                (now - generation.created) * 1000,
                generation.speculative_proposed,
                generation.speculative_accepted,
                generation.request_id_field,
            )
        if prompt_log.isEnabledFor(logging.INFO):
            text = self.tokenizer.decode(generation.output_ids, skip_special_tokens=True)
            prompt_log.info("event=output id=%s finish=%s text=%r", generation.id, finish_reason, text)
