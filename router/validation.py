"""The one validation step every front runs before the engine sees a request.

Parsing (router/params.py and each API's parser) has checked the fields and the parameter limits
(--max-stop-sequences, --max-top-n-tokens, ...). What is left needs the model and the engine: the
grammar compiled over the tokenizer, the chat template and the tokenizer, then the lengths: the prompt
within --max-input-tokens, prompt plus new tokens within --max-total-tokens and within what one
sequence may hold of the KV cache.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from mixserve.router.bad_words import bad_word_ids
from mixserve.router.engine_api import EngineAPI, EngineStats
from mixserve.router.errors import ValidationError
from mixserve.router.params import GenerationParams, GenerationRequest, render_prompt
from mixserve.router.prediction import prediction_ids
from mixserve.router.structured import compile_grammar


@dataclass(slots=True, frozen=True)
class ValidRequest:
    """A request ready for `EngineAPI.submit`."""

    prompt_ids: list[int]
    params: GenerationParams


def prompt_ids(engine: EngineAPI, request: GenerationRequest) -> list[int]:
    """Prompt ids: a raw prompt gets the tokenizer's special tokens (BOS) unless it asks not to; a rendered chat
    already has them; token ids are taken as given, once checked against the vocabulary."""
    if request.prompt_token_ids is not None:
        check_in_vocabulary(engine, "the prompt", request.prompt_token_ids)
        return list(request.prompt_token_ids)
    text = render_prompt(engine.tokenizer, request)
    special = request.messages is None and request.add_special_tokens
    return engine.tokenizer(text, add_special_tokens=special)["input_ids"]


def room(stats: EngineStats, prompt_len: int) -> int:
    """The most new tokens a prompt can get: up to max_total_tokens, and what one sequence's KV may hold
    (the last sampled token is never written to the cache)."""
    cache_room = stats.max_sequence_tokens + 1 - prompt_len
    return max(1, min(stats.limits.max_total_tokens - prompt_len, cache_room))


def check_lengths(stats: EngineStats, prompt_len: int, max_new_tokens: int) -> None:
    """Raise ValidationError unless a prompt of `prompt_len` tokens and `max_new_tokens` can run."""
    limits = stats.limits
    if prompt_len == 0:
        raise ValidationError("the prompt is empty")
    if prompt_len > limits.max_input_tokens:
        raise ValidationError(
            f"the prompt has {prompt_len} tokens, more than max_input_tokens {limits.max_input_tokens}"
        )
    total = prompt_len + max_new_tokens
    if total > limits.max_total_tokens:
        raise ValidationError(
            f"prompt tokens ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_total_tokens {limits.max_total_tokens}"
        )
    if total - 1 > stats.max_sequence_tokens:
        raise ValidationError(
            f"prompt tokens ({prompt_len}) + max_new_tokens ({max_new_tokens}) do not fit the KV cache "
            f"({stats.max_sequence_blocks} blocks of {stats.block_size} tokens)"
        )


def check_priority(stats: EngineStats, priority: int) -> None:
    """A priority other than 0 only where the router schedules by priority (vLLM refuses it the same way)."""
    if priority and stats.limits.scheduling_policy != "priority":
        raise ValidationError(
            f"priority {priority} needs the server started with --scheduling-policy priority; it schedules "
            "first come, first served"
        )


def check_in_vocabulary(engine: EngineAPI, name: str, token_ids: Iterable[int]) -> None:
    """Raise ValidationError when `token_ids` (the field `name`) hold an id the vocabulary does not have."""
    vocab = len(engine.tokenizer)
    largest = max(token_ids, default=-1)
    if largest >= vocab:
        raise ValidationError(f"{name} names token id {largest}; the vocabulary has {vocab} tokens")


def check_token_fields(engine: EngineAPI, params: GenerationParams, answer: bool = False) -> None:
    """Raise ValidationError when logit_bias or allowed_token_ids name a token id the vocabulary does not
    have; tokenize bad_words into `params.bad_word_ids`, the prediction into `params.prediction_ids` (`answer`:
    as a chat answer of its own, router/prediction.py)."""
    check_in_vocabulary(engine, "logit_bias", params.logit_bias)
    check_in_vocabulary(engine, "allowed_token_ids", params.allowed_token_ids)
    params.bad_word_ids = bad_word_ids(engine.tokenizer, params.bad_words)
    if params.prediction:
        limit = engine.stats().limits.max_total_tokens
        params.prediction_ids = prediction_ids(engine.tokenizer, params.prediction, limit, answer)


async def check_params(engine: EngineAPI, params: GenerationParams, answer: bool = False) -> None:
    """Check what of `params` needs the model or the engine: the grammar compiles over the router's tokenizer
    (in a worker thread; `params` keeps the compiled grammar), the priority (check_priority) and the token
    fields (check_token_fields)."""
    await compile_grammar(params, engine.tokenizer)
    check_priority(engine.stats(), params.priority)
    check_token_fields(engine, params, answer)


async def validate(engine: EngineAPI, request: GenerationRequest, truncate: int | None = None) -> ValidRequest:
    """Check `request`'s parameters (check_params), tokenize it (keeping its last `truncate` tokens when given)
    and check its lengths."""
    await check_params(engine, request.params, answer=request.answers_chat)
    ids = prompt_ids(engine, request)
    if truncate is not None:
        ids = ids[-truncate:]
    check_lengths(engine.stats(), len(ids), request.params.max_new_tokens)
    return ValidRequest(ids, request.params)
