"""The tool turns of a chat and the prompt that offers tools: an assistant's `tool_calls` and `tool` messages
checked, then put in the form the model's chat template takes (router/tools.py's docstring: a template that
takes `tools` renders them itself; for one that does not, the tool schemas go into a system preamble, calls
are rendered as the JSON the model is asked to write and tool results as user turns)."""

import asyncio
import functools
import json
import uuid
from typing import TYPE_CHECKING, Any

from mixserve.router.errors import BadRequest, ValidationError, json_type_name
from mixserve.router.structured import compile_spec, json_schema_spec
from mixserve.router.tools import NO_PARAMETERS, Function, ToolPlan, call_token_id, calls_grammar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from mixserve.router.params import GenerationParams, GenerationRequest

# Mistral's templates require tool call ids of 9 alphanumerics.
MISTRAL_ID_LENGTH = 9
PREAMBLE = (
    "You can call the following functions, described as JSON schemas:\n{tools}\n"
    "To call functions, answer with only a JSON array of calls, each "
    '{{"name": <function name>, "arguments": <object following its parameters>}}.'
)


def _arguments(where: str, value: object) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValidationError(f"{where} must be a JSON object, got {json_type_name(value)}")
    return value


def parse_tool_turns(messages: list[Any]) -> list[Any]:
    """Validate the tool parts of a conversation: an assistant's `tool_calls` (ids, names, arguments a JSON
    object) and `tool` messages (content and a `tool_call_id` of an earlier call). Each becomes a message
    with `tool_calls` as `[{"id", "name", "arguments": dict}]` or a `tool_call_id` and the called `name`;
    other messages are returned as they are."""
    called: dict[str, str] = {}
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("assistant", "tool"):
            out.append(message)
            continue
        if message["role"] == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise BadRequest(f"messages[{i}].tool_call_id must be a string, got {json_type_name(call_id)}")
            if call_id not in called:
                raise ValidationError(f"messages[{i}].tool_call_id {call_id!r} answers no earlier assistant tool call")
            if not isinstance(message.get("content"), str):
                raise BadRequest(
                    f"messages[{i}].content must be a string, got {json_type_name(message.get('content'))}"
                )
            out.append(
                {"role": "tool", "content": message["content"], "tool_call_id": call_id, "name": called[call_id]}
            )
            continue
        tool_calls = message.get("tool_calls")
        if tool_calls is None or tool_calls == []:
            out.append(message)
            continue
        if not isinstance(tool_calls, list):
            raise BadRequest(f"messages[{i}].tool_calls must be an array, got {json_type_name(tool_calls)}")
        calls = []
        for j, call in enumerate(tool_calls):
            where = f"messages[{i}].tool_calls[{j}]"
            if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                raise BadRequest(f"{where} must be an object with a function")
            if not isinstance(call.get("id"), str) or not call["id"]:
                raise BadRequest(f"{where}.id must be a non-empty string")
            name = call["function"].get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"{where}.function.name must be a non-empty string")
            arguments = _arguments(f"{where}.function.arguments", call["function"].get("arguments"))
            called[call["id"]] = name
            calls.append({"id": call["id"], "name": name, "arguments": arguments})
        content = message.get("content")
        out.append({"role": "assistant", "content": content if isinstance(content, str) else "", "tool_calls": calls})
    return out


@functools.cache
def template_takes_tools(tokenizer: "PreTrainedTokenizerBase") -> bool:
    """Whether the chat template renders `tools` (a conversation renders differently with a tool)."""
    if tokenizer.chat_template is None:
        return False
    conversation = [{"role": "user", "content": "x"}]
    probe = [Function("probe", "", NO_PARAMETERS).as_tool()]
    try:
        plain = tokenizer.apply_chat_template(conversation, tokenize=False)
        with_tools = tokenizer.apply_chat_template(conversation, tools=probe, tokenize=False)
    except Exception:  # noqa: BLE001 - any failure of a template with tools means it cannot take them
        return False
    return plain != with_tools


def mistral_id(call_id: str) -> str:
    """A stable 9-alphanumeric id for `call_id`, as Mistral's templates require."""
    digest = uuid.uuid5(uuid.NAMESPACE_OID, call_id).hex
    return digest[:MISTRAL_ID_LENGTH]


def _calls_json(calls: list[dict[str, Any]]) -> str:
    return json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls], ensure_ascii=False)


def _with_preamble(messages: list[dict[str, Any]], functions: tuple[Function, ...]) -> list[dict[str, Any]]:
    tools = "\n".join(json.dumps(f.as_tool()["function"], ensure_ascii=False) for f in functions)
    preamble = PREAMBLE.format(tools=tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{preamble}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]


def as_text_turns(messages: list[dict[str, Any]], functions: tuple[Function, ...]) -> list[dict[str, str]]:
    """A conversation for a template without tools: the tools in a system preamble, calls as the JSON the
    model is asked to write, tool results as user turns (merged with the user turns around them)."""
    out: list[dict[str, str]] = []
    from_tool = False
    for message in messages:
        if message["role"] == "tool":
            text = f"Result of {message['name']} (call {message['tool_call_id']}): {message['content']}"
            role = "user"
        elif message.get("tool_calls"):
            text = "\n".join(p for p in (message["content"], _calls_json(message["tool_calls"])) if p)
            role = "assistant"
        else:
            text, role = message["content"], message["role"]
        is_tool = message["role"] == "tool"
        if out and role == "user" and out[-1]["role"] == "user" and (is_tool or from_tool):
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n\n{text}"}
        else:
            out.append({"role": role, "content": text})
        from_tool = is_tool
    return _with_preamble(out, functions) if functions else out


def as_template_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation for a template that takes tools (Hugging Face's convention: arguments as objects)."""
    out = []
    for message in messages:
        if message["role"] == "tool":
            out.append({**message, "tool_call_id": mistral_id(message["tool_call_id"])})
        elif message.get("tool_calls"):
            calls = [
                {
                    "id": mistral_id(c["id"]),
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in message["tool_calls"]
            ]
            out.append({"role": "assistant", "content": message["content"], "tool_calls": calls})
        else:
            out.append(message)
    return out


async def fit_to_template(
    plan: ToolPlan | None,
    request: "GenerationRequest",
    params: "GenerationParams",
    tokenizer: "PreTrainedTokenizerBase",
) -> None:
    """Put `plan`'s tools and `request`'s tool turns in the form the chat template takes, and set the grammar of
    a forced call in `params` (or of `auto`'s text or call, where the template has the call token and the
    request no other constraint); every offered function's `parameters` must compile (422 naming the tool)."""
    has_turns = any("tool_calls" in m or "tool_call_id" in m for m in request.messages)
    if plan is None and not has_turns:
        return
    functions = plan.offered if plan else ()
    loop = asyncio.get_running_loop()
    for i, function in enumerate(functions):
        spec = json_schema_spec(f"tools[{i}].function.parameters", function.parameters)
        await loop.run_in_executor(None, compile_spec, spec, tokenizer)
    native = template_takes_tools(tokenizer)
    if native:
        request.messages = as_template_turns(request.messages)
        request.tools = [f.as_tool() for f in functions] or None
    else:
        request.messages = as_text_turns(request.messages, functions)
    if plan is not None and plan.forced:
        if params.grammar is not None:
            raise ValidationError(f"give one output constraint, got tool_choice and {params.grammar.field}")
        if params.ignore_eos:
            raise ValidationError("tool_choice required or a function cannot be combined with ignore_eos or min_tokens")
        params.grammar = calls_grammar(plan, call_token_id(tokenizer) if native else None)
    elif plan is not None and plan.choice == "auto" and native and params.grammar is None and not params.ignore_eos:
        token_id = call_token_id(tokenizer)
        if token_id is not None:
            params.grammar = calls_grammar(plan, token_id)
