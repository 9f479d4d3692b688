"""A Responses API body (`POST /v1/responses`, router/api_responses.py) read as the chat completion it amounts
to: `instructions` and `input` (a string, or message, `function_call` and `function_call_output` items) become
the messages, `max_output_tokens` the token limit, `tools` (the flat function form) the chat form, and
`text.format` (a JSON schema, or any JSON object) the chat `response_format`, so the output follows it as a
chat answer's does. What it cannot honour (stored responses and conversations, background runs, stored
prompts) is a 422 rather than ignored.
"""

from typing import Any

from mixserve.router.errors import BadRequest, ValidationError, json_type_name
from mixserve.router.fields import as_text_parts
from mixserve.router.openai_vllm import unsupported

TEXT_PARTS = ("input_text", "output_text", "text")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of `instructions` and `input`."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        messages.append({"role": "system", "content": as_text_parts("instructions", instructions, TEXT_PARTS)})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("input is required: a string or a non-empty array of input items")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{i}] must be an object, got {json_type_name(item)}")
        kind = item.get("type", "message")
        if kind == "message":
            role = "system" if item.get("role") == "developer" else item.get("role")
            content = as_text_parts(f"input[{i}].content", item.get("content"), TEXT_PARTS)
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name")}}
            call["function"]["arguments"] = item.get("arguments")
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = as_text_parts(f"input[{i}].output", output, TEXT_PARTS)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        else:
            raise ValidationError(
                f"input[{i}].type {kind!r} is not supported (message, function_call, function_call_output)"
            )
    return messages


def _tools(value: object) -> object:
    """The Responses API's flat function tools in the chat form (anything else left for the chat parser)."""
    if not isinstance(value, list):
        return value
    tools = []
    for i, tool in enumerate(value):
        if isinstance(tool, dict) and tool.get("type") not in (None, "function"):
            raise ValidationError(f"tools[{i}].type {tool.get('type')!r} is not supported: only function tools")
        if isinstance(tool, dict) and "function" not in tool:
            function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            tool = {"type": "function", "function": function}
        tools.append(tool)
    return tools


def text_format(body: dict[str, Any]) -> dict[str, Any]:
    """`text.format` as given (`{"type": "text"}` where it is not): what the answer reports."""
    text = body.get("text")
    if text is None:
        return {"type": "text"}
    if not isinstance(text, dict):
        raise BadRequest(f"text must be an object, got {json_type_name(text)}")
    form = text.get("format")
    if form is None:
        return {"type": "text"}
    if not isinstance(form, dict):
        raise BadRequest(f"text.format must be an object, got {json_type_name(form)}")
    return form


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """The chat `response_format` of `text.format`: a JSON schema (its name, schema, strict and description
    in the chat form's json_schema), any JSON object, or none for text."""
    form = text_format(body)
    kind = form.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        fields = ("name", "schema", "strict", "description")
        return {"type": "json_schema", "json_schema": {k: form[k] for k in fields if k in form}}
    raise ValidationError(f"text.format.type {kind!r} is not supported (text, json_object, json_schema)")


# The `include` value that asks for the output tokens' logprobs; the others name what tools and reasoning this
# server has none of, so there is nothing of theirs to leave out.
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """The chat logprobs fields of `include` and `top_logprobs` (either asks for the output's logprobs)."""
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(v, str) for v in include)):
        raise BadRequest("include must be an array of strings")
    top = body.get("top_logprobs")
    if not (include and LOGPROBS_INCLUDE in include) and top is None:
        return {}
    return {"logprobs": True, "top_logprobs": top}


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions body a Responses body amounts to."""
    if body.get("previous_response_id") is not None:
        raise ValidationError("previous_response_id is not supported: responses are not stored; send the input")
    unsupported(body, "conversation", "responses are not stored; send the input")
    unsupported(body, "background", "a response runs while its request waits (stream it for progress)")
    unsupported(body, "prompt", "no stored prompt templates; send instructions and input")
    keep = ("model", "temperature", "top_p", "tool_choice", "parallel_tool_calls", "stream", "seed", "priority")
    chat = {k: body[k] for k in keep if k in body}
    response_format = _response_format(body)
    if response_format is not None:
        chat["response_format"] = response_format
    chat.update(_logprobs(body))
    return {
        **chat,
        "messages": _messages(body),
        "max_tokens": body.get("max_output_tokens"),
        "tools": _tools(body.get("tools")),
    }
