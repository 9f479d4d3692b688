"""The OpenAI response objects: `chat.completion` / `text_completion` and their streamed chunks.

One response gathers one or more engine requests (`n` choices, or a list of prompts); their token
events are interleaved as they arrive and turned into OpenAI's shapes, with `usage`, finish
reasons and logprobs. The requests are parsed in router/openai_requests.py, the routes are router/api_openai.py.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from mixserve.router.engine_api import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, EngineAPI, GenerationHandle, TokenEvent
from mixserve.router.openai_logprobs import CompletionLogprobs, chat_logprobs, token_namer, vllm_prompt_logprobs
from mixserve.router.openai_token_ids import TokenIds, completion_token_ids
from mixserve.router.prediction import completion_details
from mixserve.router.tools import ToolCall, ToolPlan, may_be_calls, parse_calls

FINISH_REASONS = {FINISH_EOS: "stop", FINISH_STOP: "stop", FINISH_LENGTH: "length"}


class Reporting(Protocol):
    """What a response reports besides the text (router/openai_requests.py's OpenAIRequest)."""

    logprobs: int | None  # None: no logprobs; else the alternatives per token
    include_usage: bool
    continuous_usage: bool  # vLLM's continuous_usage_stats: every chunk carries the usage so far
    echo: bool  # completions: the prompt before each choice's text (and its tokens' logprobs)
    score_only: bool  # completions with echo and max_tokens 0: the prompt alone, no completion
    prompt_logprobs: int | None  # vLLM's: the prompt tokens' logprobs with this many alternatives each
    tools: ToolPlan | None  # chat: the tools offered (their calls are parsed out of the output)
    return_tokens_as_token_ids: bool  # vLLM's: logprobs name tokens "token_id:N"
    return_token_ids: bool  # vLLM's: the prompt's and each choice's token ids beside the text


@dataclass(slots=True)
class Choices:
    """The engine requests behind one response, in choice order (prompt-major, then `n`)."""

    generations: list[GenerationHandle]
    prompt_tokens: int
    prompts: list[str] = field(default_factory=list)  # each choice's prompt text (completions)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    predicted: bool = False  # the request had a predicted output: usage says what became of it

    def usage(self, generated: bool = True) -> dict[str, Any]:
        """The token counts; without `generated` (a prompt scored alone), no completion tokens: the one
        token each generation ran for is not reported. A predicted request's add the prediction's proposed
        tokens kept and not (router/prediction.py)."""
        completion = sum(g.generated_tokens for g in self.generations) if generated else 0
        counts: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }
        if self.predicted:
            counts["completion_tokens_details"] = completion_details(self.generations)
        return counts


class ChunkUsage:
    """What each streamed chunk says of usage: nothing; null (include_usage: a last chunk holds it); or, with
    vLLM's continuous_usage_stats, the tokens so far (the prompts', and the completion's streamed)."""

    __slots__ = ("include", "continuous", "prompt_tokens", "streamed")

    def __init__(self, request: Reporting, choices: Choices) -> None:
        self.include = request.include_usage
        self.continuous = request.continuous_usage
        self.prompt_tokens = choices.prompt_tokens
        self.streamed = 0  # token events streamed, over every choice

    def __call__(self) -> dict[str, Any]:
        if not self.include:
            return {}
        if not self.continuous:
            return {"usage": None}
        total = self.prompt_tokens + self.streamed
        return {
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.streamed, "total_tokens": total}
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


def _header(choices: Choices, kind: str, model: str, prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{choices.id}", "object": kind, "created": choices.created, "model": model}


def tool_calls_in(plan: ToolPlan | None, text: str) -> list[ToolCall] | None:
    """The calls an output makes, when tools were offered and it parses as calls of them."""
    if plan is None or not plan.offered:
        return None
    return parse_calls(text, plan.offered)


def _chat_message(plan: ToolPlan | None, text: str, finish: str) -> tuple[dict[str, Any], str]:
    calls = tool_calls_in(plan, text)
    if calls is None:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": None, "tool_calls": [c.as_dict() for c in calls]}, "tool_calls"


async def chat_completion(engine: EngineAPI, request: Reporting, choices: Choices, model: str) -> dict[str, Any]:
    """The non-streaming `chat.completion` object."""
    name = token_namer(engine.tokenizer, request.return_tokens_as_token_ids)
    texts = [[] for _ in choices.generations]
    ids: list[list[int]] = [[] for _ in choices.generations]
    logprobs: list[list[dict]] = [[] for _ in choices.generations]
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            texts[i].append(event.text)
            ids[i].append(event.token_id)
            if request.logprobs is not None:
                logprobs[i].append(chat_logprobs(name, event, request.logprobs))
    answers = []
    for i, generation in enumerate(choices.generations):
        message, finish = _chat_message(request.tools, "".join(texts[i]), FINISH_REASONS[generation.finish_reason])
        logprob = None if request.logprobs is None else {"content": logprobs[i]}
        answers.append({"index": i, "message": message, "logprobs": logprob, "finish_reason": finish})
        if request.return_token_ids:
            answers[-1]["token_ids"] = ids[i]
    answer = {**_header(choices, "chat.completion", model, "chatcmpl"), "choices": answers, "usage": choices.usage()}
    if request.return_token_ids:  # one prompt for every choice
        answer["prompt_token_ids"] = list(choices.generations[0].prompt_ids)
    if request.prompt_logprobs is not None:  # vLLM's: one prompt for every choice
        first = choices.generations[0]
        answer["prompt_logprobs"] = vllm_prompt_logprobs(engine.tokenizer, first, request.prompt_logprobs)
    return answer


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's streamed form of `calls`: per call, a delta with its id, type and name (arguments empty), then
    one with the arguments."""
    deltas = []
    for k, call in enumerate(calls):
        head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        deltas.append({"tool_calls": [head]})
        deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
    return deltas


@dataclass(slots=True)
class HeldText:
    """A streamed choice's text while it may still be tool calls: a forced call is held whole; under `auto`
    text is held only while its start could be calls (`[`, `{` or `[TOOL_CALLS]`), then streamed."""

    plan: ToolPlan | None
    text: str = ""
    holding: bool = False

    def __post_init__(self) -> None:
        self.holding = self.plan is not None and bool(self.plan.offered)

    def add(self, text: str) -> str:
        """The text to stream now."""
        if not self.holding:
            return text
        self.text += text
        if self.plan.forced or may_be_calls(self.text):
            return ""
        self.holding, released = False, self.text
        return released

    def finish(self, finish: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas that end a held output, and its finish reason."""
        if not self.holding:
            return [], finish
        calls = parse_calls(self.text, self.plan.offered)
        if calls is None:
            return ([{"content": self.text}] if self.text else []), finish
        return tool_call_deltas(calls), "tool_calls"


async def chat_chunks(
    engine: EngineAPI, request: Reporting, choices: Choices, model: str
) -> AsyncGenerator[dict | str, None]:
    """`chat.completion.chunk` events: a choice's first delta carries the role, its last the finish reason."""
    header = _header(choices, "chat.completion.chunk", model, "chatcmpl")
    name = token_namer(engine.tokenizer, request.return_tokens_as_token_ids)
    usage = ChunkUsage(request, choices)
    held = [HeldText(request.tools) for _ in choices.generations]
    ids = TokenIds(request.return_token_ids, choices.generations)
    started: set[int] = set()
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            if i not in started:
                started.add(i)
                delta = {"role": "assistant", "content": ""}
                role = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                yield {**header, "choices": [role], **usage(), **ids.prompt(i)}
            usage.streamed += 1  # one event a token
            ids.add(i, event.token_id)
            finish = FINISH_REASONS.get(event.finish_reason)
            text = held[i].add(event.text)
            if finish is not None:
                ending, finish = held[i].finish(finish)
                for delta in ending:
                    part = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield {**header, "choices": [part], **usage()}
            if not text and finish is None and request.logprobs is None:
                continue
            choice = {
                "index": i,
                "delta": {"content": text} if text else {},
                "logprobs": None
                if request.logprobs is None
                else {"content": [chat_logprobs(name, event, request.logprobs)]},
                "finish_reason": finish,
                **ids.take(i),
            }
            yield {**header, "choices": [choice], **usage()}
    if request.include_usage:
        yield {**header, "choices": [], "usage": choices.usage()}
    yield "[DONE]"


async def completion(engine: EngineAPI, request: Reporting, choices: Choices, model: str) -> dict[str, Any]:
    """The non-streaming `text_completion` object."""
    name = token_namer(engine.tokenizer, request.return_tokens_as_token_ids)
    texts = [[] for _ in choices.generations]
    ids: list[list[int]] = [[] for _ in choices.generations]
    logprobs = [CompletionLogprobs() for _ in choices.generations]
    offsets = [0] * len(choices.generations)
    if request.echo:
        offsets = [len(prompt) for prompt in choices.prompts]
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            if request.score_only:  # the prompt was what the request asked for
                continue
            if request.logprobs is not None:
                logprobs[i].add(name, event, offsets[i], request.logprobs)
            texts[i].append(event.text)
            ids[i].append(event.token_id)
            offsets[i] += len(event.text)
    if request.echo:
        # The prompt's logprobs are complete once its first token came.
        for i, (prompt, generation) in enumerate(zip(choices.prompts, choices.generations, strict=True)):
            texts[i].insert(0, prompt)
            if request.logprobs is not None:
                echoed = CompletionLogprobs()
                echoed.add_prompt(engine.tokenizer, name, prompt, generation, request.logprobs)
                echoed.extend(logprobs[i])
                logprobs[i] = echoed
    return {
        **_header(choices, "text_completion", model, "cmpl"),
        "choices": [
            {
                "index": i,
                "text": "".join(texts[i]),
                "logprobs": None if request.logprobs is None else logprobs[i].as_dict(),
                "finish_reason": "length" if request.score_only else FINISH_REASONS[g.finish_reason],
                **(
                    {}
                    if request.prompt_logprobs is None
                    else {"prompt_logprobs": vllm_prompt_logprobs(engine.tokenizer, g, request.prompt_logprobs)}
                ),
                **(completion_token_ids(g, ids[i], request.echo) if request.return_token_ids else {}),
            }
            for i, g in enumerate(choices.generations)
        ],
        "usage": choices.usage(generated=not request.score_only),
    }


async def completion_chunks(
    engine: EngineAPI, request: Reporting, choices: Choices, model: str
) -> AsyncGenerator[dict | str, None]:
    """`text_completion` events, one per token that adds text (or logprobs), the finish reason on the last; with
    `echo`, each choice's first event starts with its prompt (and the prompt's logprobs, scored by then)."""
    header = _header(choices, "text_completion", model, "cmpl")
    name = token_namer(engine.tokenizer, request.return_tokens_as_token_ids)
    usage = ChunkUsage(request, choices)
    offsets = [0] * len(choices.generations)
    to_echo = set(range(len(choices.generations))) if request.echo else set()
    ids = TokenIds(request.return_token_ids, choices.generations)
    async with aclosing(interleave(choices.generations)) as events:
        async for i, event in events:
            usage.streamed += 1  # one event a token
            ids.add(i, event.token_id)
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
                ids.echo(i)
                if request.logprobs is not None:
                    one.add_prompt(engine.tokenizer, name, prompt, choices.generations[i], request.logprobs)
            logprobs = None
            if request.logprobs is not None:
                one.add(name, event, offsets[i], request.logprobs)
                logprobs = one.as_dict()
            offsets[i] += len(event.text)
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
            choice.update(ids.prompt(i), **ids.take(i))
            yield {**header, "choices": [choice], **usage()}
    if request.include_usage:
        yield {**header, "choices": [], "usage": choices.usage()}
    yield "[DONE]"
