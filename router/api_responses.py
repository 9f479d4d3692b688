"""OpenAI's Responses API: `POST /v1/responses`, streamed and not, text and function calls.

A Responses body is read as the chat completion it amounts to (router/responses_body.py, then
router/openai_requests.py's parser, tools and grammar): its input items become the messages, `text.format`
the output's JSON schema. The answer is a `response` object whose `output` holds one `message` item with the text,
or one `function_call` item per call. Streams send OpenAI's typed events as SSE `data:` lines:
`response.created`, `response.in_progress`, per item `response.output_item.added` and `.done`, for text
`response.content_part.added`, `response.output_text.delta`, `response.output_text.done` and
`response.content_part.done`, for calls `response.function_call_arguments.delta` and `.done`, and last
`response.completed` (or `response.incomplete` at the token limit). Stored responses
(`previous_response_id`, `store`) and built-in tools are not served.
"""

import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web

from mixserve.router.api_openai import check_model, submit
from mixserve.router.engine_api import EngineAPI, TokenEvent
from mixserve.router.errors import RouterError
from mixserve.router.http_common import CONFIG, ENGINE, read_json, stream_sse
from mixserve.router.openai_errors import error_body, openai_errors
from mixserve.router.openai_logprobs import chat_logprobs, token_namer
from mixserve.router.openai_requests import parse_chat_request, prepare_tools
from mixserve.router.openai_responses import FINISH_REASONS, Choices, HeldText, interleave, tool_calls_in
from mixserve.router.responses_body import chat_body, text_format
from mixserve.router.tools import ToolCall


class ResponseBuilder:
    """The `response` object and its items, for one generation."""

    def __init__(
        self, body: dict[str, Any], model: str, choices: Choices, logprobs: int | None, name: Callable[[int], str]
    ) -> None:
        """`logprobs`: None, or the alternatives each output token's logprobs list (`include` asked for them);
        `name` spells a token for them."""
        self.body, self.model, self.choices = body, model, choices
        self.logprobs, self.name = logprobs, name
        self.id = f"resp_{choices.id}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0

    def response(self, status: str, output: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
        """The `response` object in `status` with `output`."""
        usage = self.choices.usage()
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.choices.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.body.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.body.get("parallel_tool_calls", True),
            "temperature": self.body.get("temperature"),
            "top_p": self.body.get("top_p"),
            "tool_choice": self.body.get("tool_choice", "auto"),
            "tools": self.body.get("tools") or [],
            "text": {"format": text_format(self.body)},
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            },
        }

    def message(self, text: str, status: str = "completed", logprobs: list[dict] | None = None) -> dict[str, Any]:
        """The `message` output item."""
        content = [] if status == "in_progress" else [self.text_part(text, logprobs)]
        return {"type": "message", "id": self.message_id, "role": "assistant", "status": status, "content": content}

    @staticmethod
    def text_part(text: str, logprobs: list[dict] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def token_logprobs(self, event: TokenEvent) -> list[dict[str, Any]]:
        """The token's logprobs entry (chat's form, which the Responses API shares) where they were asked for."""
        return [] if self.logprobs is None else [chat_logprobs(self.name, event, self.logprobs)]

    @staticmethod
    def function_call(call: ToolCall, status: str = "completed") -> dict[str, Any]:
        """A `function_call` output item."""
        arguments = "" if status == "in_progress" else call.arguments
        item = {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id}
        return {**item, "name": call.name, "arguments": arguments, "status": status}

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One stream event, numbered."""
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def message_opened(self) -> list[dict[str, Any]]:
        """The events that open the message item and its text part, before its first delta."""
        return [
            self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress")),
            self.event(
                "response.content_part.added",
                item_id=self.message_id,
                output_index=0,
                content_index=0,
                part=self.text_part(""),
            ),
        ]


def _status(finish: str) -> str:
    return "incomplete" if finish == "length" else "completed"


async def respond(engine: EngineAPI, plan, builder: ResponseBuilder) -> dict[str, Any]:
    """The non-streamed `response` object."""
    texts, logprobs = [], []
    async with aclosing(interleave(builder.choices.generations)) as events:
        async for _, event in events:
            texts.append(event.text)
            logprobs += builder.token_logprobs(event)
    text = "".join(texts)
    finish = FINISH_REASONS[builder.choices.generations[0].finish_reason]
    calls = tool_calls_in(plan, text)
    output = [builder.function_call(c) for c in calls] if calls else [builder.message(text, logprobs=logprobs)]
    return builder.response(_status(finish), output, finish)


async def response_events(engine: EngineAPI, plan, builder: ResponseBuilder) -> AsyncGenerator[dict, None]:
    """The stream's events (router/api_responses.py's module docstring)."""
    yield builder.event("response.created", response=builder.response("in_progress", []))
    yield builder.event("response.in_progress", response=builder.response("in_progress", []))
    held = HeldText(plan)
    streamed: list[str] = []
    # With logprobs: the tokens' entries not yet sent (a token that adds no text waits for the next delta).
    pending: list[dict] = []
    logprobs: list[dict] = []
    ids = {"item_id": builder.message_id, "output_index": 0}
    finish = "stop"
    async with aclosing(interleave(builder.choices.generations)) as events:
        async for _, event in events:
            text = held.add(event.text)
            pending += builder.token_logprobs(event)
            if event.finish_reason is not None:
                finish = FINISH_REASONS[event.finish_reason]
            if not text:
                continue
            if not streamed:
                for opened in builder.message_opened():
                    yield opened
            streamed.append(text)
            logprobs += pending
            yield builder.event("response.output_text.delta", **ids, content_index=0, delta=text, logprobs=pending)
            pending = []
    calls = tool_calls_in(plan, held.text) if held.holding else None
    if calls:
        output = []
        for k, call in enumerate(calls):
            item = builder.function_call(call)
            yield builder.event(
                "response.output_item.added", output_index=k, item=builder.function_call(call, "in_progress")
            )
            fields = {"item_id": item["id"], "output_index": k}
            yield builder.event("response.function_call_arguments.delta", **fields, delta=call.arguments)
            yield builder.event(
                "response.function_call_arguments.done", **fields, name=call.name, arguments=call.arguments
            )
            yield builder.event("response.output_item.done", output_index=k, item=item)
            output.append(item)
        yield builder.event("response.completed", response=builder.response("completed", output))
        return
    if held.holding and held.text:
        if not streamed:
            for opened in builder.message_opened():
                yield opened
        streamed.append(held.text)
        logprobs += pending
        yield builder.event("response.output_text.delta", **ids, content_index=0, delta=held.text, logprobs=pending)
        pending = []
    text = "".join(streamed)
    logprobs += pending  # tokens that ended the output without text of their own
    if not streamed:
        for opened in builder.message_opened():
            yield opened
    yield builder.event("response.output_text.done", **ids, content_index=0, text=text, logprobs=logprobs)
    part = builder.text_part(text, logprobs)
    yield builder.event("response.content_part.done", **ids, content_index=0, part=part)
    yield builder.event("response.output_item.done", output_index=0, item=builder.message(text, logprobs=logprobs))
    status = _status(finish)
    kind = "response.completed" if status == "completed" else "response.incomplete"
    yield builder.event(kind, response=builder.response(status, [builder.message(text, logprobs=logprobs)], finish))


def _error_event(exc: RouterError) -> dict[str, Any]:
    return {"type": "error", "code": error_body(exc)["error"]["code"], "message": str(exc), "param": None}


@openai_errors
async def responses(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses`."""
    engine = request.app[ENGINE]
    body = await read_json(request)
    model = check_model(body, request.app[CONFIG])
    parsed = parse_chat_request(chat_body(body), request.app[CONFIG].limits)
    await prepare_tools(parsed, engine.tokenizer)
    choices = await submit(engine, parsed, None)
    builder = ResponseBuilder(body, model, choices, parsed.logprobs, token_namer(engine.tokenizer, False))
    if parsed.params.stream:
        return await stream_sse(request, response_events(engine, parsed.tools, builder), _error_event)
    return web.json_response(await respond(engine, parsed.tools, builder))


def add_routes(app: web.Application) -> None:
    """Register `POST /v1/responses` on `app`."""
    app.router.add_post("/v1/responses", responses)
