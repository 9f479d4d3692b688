"""The OpenAI response objects: `chat.completion` / `text_completion` and their streamed chunks.

One response gathers one or more engine requests (`n` choices, or a list of prompts); their token
events are interleaved as they arrive and turned into OpenAI's shapes, with `usage`, finish
reasons and logprobs. Parsing the requests and the routes are router/api_openai.py.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.detokenizer import token_piece
from router.engine_api import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, EngineAPI, GenerationHandle, TokenEvent

FINISH_REASONS = {FINISH_EOS: "stop", FINISH_STOP: "stop", FINISH_LENGTH: "length"}


class Reporting(Protocol):
    """What a response reports besides the text (router/api_openai.py's OpenAIRequest)."""

    logprobs: int | None  # None: no logprobs; else the alternatives per token
    include_usage: bool
    echo: bool  # completions: the prompt before each choice's text (and its tokens' logprobs)


@dataclass(slots=True)
class Choices:
    """The engine requests behind one response, in choice order (prompt-major, then `n`)."""

    generations: list[GenerationHandle]
    prompt_tokens: int
    prompts: list[str] = field(default_factory=list)  # each choice's prompt text (completions)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, int]:
        completion = sum(g.generated_tokens for g in self.generations)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


async def interleave(generations: list[GenerationHandle]) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """Every choice's token events as they arrive, tagged with the choice index. Leaving early (or a
    failure of any choice) cancels every choice still running."""
    streams = [g.stream() for g in generations]
    if len(streams) == 1:  # n = 1, the usual case: no task and wait per token
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, event
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def _chat_logprobs(tokenizer, event: TokenEvent) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        piece = token_piece(tokenizer, token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {**entry(event.token_id, event.logprob), "top_logprobs": [entry(t, lp) for t, lp in event.top_tokens]}


@dataclass(slots=True)
class CompletionLogprobs:
    """The legacy completions `logprobs` object, built token by token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, tokenizer, event: TokenEvent, offset: int) -> None:
        piece = token_piece(tokenizer, event.token_id)
        self.tokens.append(piece)
        self.token_logprobs.append(event.logprob)
        # OpenAI: the requested alternatives, and always the sampled token.
        top = {token_piece(tokenizer, t): lp for t, lp in event.top_tokens}
        top.setdefault(piece, event.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def add_prompt(self, tokenizer, prompt: str, generation: GenerationHandle) -> None:
        """The echoed prompt's tokens first, as OpenAI gave them: the first token's logprob null."""
        ids = generation.prompt_ids
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]] if encoded["input_ids"] == ids else [0] * len(ids)
        for token_id, logprob, start in zip(ids, generation.prompt_logprobs, starts, strict=True):
            piece = token_piece(tokenizer, token_id)
            self.tokens.append(piece)
            self.token_logprobs.append(logprob)
            self.top_logprobs.append(None if logprob is None else {piece: logprob})
            self.text_offset.append(start)

    def extend(self, other: "CompletionLogprobs") -> None:
        """Append `other`'s tokens after these."""
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def as_dict(self) -> dict[str, list]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _header(choices: Choices, kind: str, model: str, prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{choices.id}", "object": kind, "created": choices.created, "model": model}


async def chat_completion(engine: EngineAPI, request: Reporting, choices: Choices, model: str) -> dict[str, Any]:
    """The non-streaming `chat.completion` object."""
    texts = [[] for _ in choices.generations]
    logprobs: list[list[dict]] = [[] for _ in choices.generations]
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            texts[i].append(event.text)
            if request.logprobs is not None:
                logprobs[i].append(_chat_logprobs(engine.tokenizer, event))
    return {
        **_header(choices, "chat.completion", model, "chatcmpl"),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(texts[i])},
                "logprobs": None if request.logprobs is None else {"content": logprobs[i]},
                "finish_reason": FINISH_REASONS[g.finish_reason],
            }
            for i, g in enumerate(choices.generations)
        ],
        "usage": choices.usage(),
    }


async def chat_chunks(
    engine: EngineAPI, request: Reporting, choices: Choices, model: str
) -> AsyncGenerator[dict | str, None]:
    """`chat.completion.chunk` events: a choice's first delta carries the role, its last the finish reason."""
    header = _header(choices, "chat.completion.chunk", model, "chatcmpl")
    usage: dict[str, None] = {"usage": None} if request.include_usage else {}
    started: set[int] = set()
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            if i not in started:
                started.add(i)
                delta = {"role": "assistant", "content": ""}
                role = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                yield {**header, "choices": [role], **usage}
            finish = FINISH_REASONS.get(event.finish_reason)
            if not event.text and finish is None and request.logprobs is None:
                continue
            choice = {
                "index": i,
                "delta": {"content": event.text} if event.text else {},
                "logprobs": None
                if request.logprobs is None
                else {"content": [_chat_logprobs(engine.tokenizer, event)]},
                "finish_reason": finish,
            }
            yield {**header, "choices": [choice], **usage}
    if request.include_usage:
        yield {**header, "choices": [], "usage": choices.usage()}
    yield "[DONE]"


async def completion(engine: EngineAPI, request: Reporting, choices: Choices, model: str) -> dict[str, Any]:
    """The non-streaming `text_completion` object."""
    texts = [[] for _ in choices.generations]
    logprobs = [CompletionLogprobs() for _ in choices.generations]
    offsets = [0] * len(choices.generations)
    if request.echo:
        offsets = [len(prompt) for prompt in choices.prompts]
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            if request.logprobs is not None:
                logprobs[i].add(engine.tokenizer, event, offsets[i])
            texts[i].append(event.text)
            offsets[i] += len(event.text)
    if request.echo:
        # The prompt's logprobs are complete once its first token came.
        for i, (prompt, generation) in enumerate(zip(choices.prompts, choices.generations, strict=True)):
            texts[i].insert(0, prompt)
            if request.logprobs is not None:
                echoed = CompletionLogprobs()
                echoed.add_prompt(engine.tokenizer, prompt, generation)
                echoed.extend(logprobs[i])
                logprobs[i] = echoed
    return {
        **_header(choices, "text_completion", model, "cmpl"),
        "choices": [
            {
                "index": i,
                "text": "".join(texts[i]),
                "logprobs": None if request.logprobs is None else logprobs[i].as_dict(),
                "finish_reason": FINISH_REASONS[g.finish_reason],
            }
            for i, g in enumerate(choices.generations)
        ],
        "usage": choices.usage(),
    }


async def completion_chunks(
    engine: EngineAPI, request: Reporting, choices: Choices, model: str
) -> AsyncGenerator[dict | str, None]:
    """`text_completion` events, one per token that adds text (or logprobs), the finish reason on the last; with
    `echo`, each choice's first event starts with its prompt (and the prompt's logprobs, scored by then)."""
    header = _header(choices, "text_completion", model, "cmpl")
    usage: dict[str, None] = {"usage": None} if request.include_usage else {}
    offsets = [0] * len(choices.generations)
    to_echo = set(range(len(choices.generations))) if request.echo else set()
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            finish = FINISH_REASONS.get(event.finish_reason)
            if not event.text and finish is None and request.logprobs is None and i not in to_echo:
                continue
            one = CompletionLogprobs()
            text = event.text
            if i in to_echo:
                to_echo.discard(i)
                prompt = choices.prompts[i]
                text = prompt + text
                offsets[i] = len(prompt)
                if request.logprobs is not None:
                    one.add_prompt(engine.tokenizer, prompt, choices.generations[i])
            logprobs = None
            if request.logprobs is not None:
                one.add(engine.tokenizer, event, offsets[i])
                logprobs = one.as_dict()
            offsets[i] += len(event.text)
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
            yield {**header, "choices": [choice], **usage}
    if request.include_usage:
        yield {**header, "choices": [], "usage": choices.usage()}
    yield "[DONE]"
