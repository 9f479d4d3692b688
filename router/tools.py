"""Tool calling on the router: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, the tool turns of a
conversation, the prompt and grammar that make the model call, and the parsing of its calls.

Every model writes its calls as Mistral's function-calling format does: a JSON array of
`{"name": ..., "arguments": {...}}` objects (after `[TOOL_CALLS]` on a checkpoint whose chat template takes
`tools`). Two ways to get there:

- The chat template takes `tools` (Mixtral-8x22B-Instruct: `[AVAILABLE_TOOLS]` ... `[TOOL_CALLS]`): the
  conversation and the tools are rendered by the template itself; a forced call is the `[TOOL_CALLS]` token
  then the JSON, both under the grammar.
- It does not (Mixtral-8x7B-Instruct v0.1, the demo): the tool schemas go into a system preamble, as TGI
  does; assistant calls are rendered as that JSON and tool results as user turns.

`tool_choice`: `required` and a named function constrain the output with a JSON-schema grammar (calls whose
`name` is one of the allowed functions and whose `arguments` follow that function's `parameters`, an array
of one or more when `parallel_tool_calls`, else one call), so the arguments always parse and validate.
`auto` offers the tools and leaves the output free: an answer that parses as calls of offered functions is
a tool call, anything else is content (the model decides, as it would on OpenAI; a constrained "call or
content" JSON would make every plain answer a JSON string). `none` offers no tools.
"""

import asyncio
import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.errors import BadRequest, ValidationError, json_type_name
from router.structured import JSON_OPTIONS, GrammarSpec, compile_spec, json_schema_spec, lark_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from router.params import GenerationParams, GenerationRequest

# OpenAI's rule for function names.
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHOICES = ("auto", "none", "required")
CALL_TOKEN = "[TOOL_CALLS]"
# Mistral's templates require tool call ids of 9 alphanumerics.
MISTRAL_ID_LENGTH = 9
# A function without `parameters` takes none.
NO_PARAMETERS = {"type": "object", "properties": {}}
PREAMBLE = (
    "You can call the following functions, described as JSON schemas:\n{tools}\n"
    "To call functions, answer with only a JSON array of calls, each "
    '{{"name": <function name>, "arguments": <object following its parameters>}}.'
)


@dataclass(frozen=True, slots=True)
class Function:
    """One function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]

    def as_tool(self) -> dict[str, Any]:
        """OpenAI's (and chat templates') `{"type": "function", "function": ...}` form."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """A request's tools: the offered functions, the choice (`auto`, `none`, `required`, or `function` with
    `named`), and whether several calls may come at once."""

    functions: tuple[Function, ...]
    choice: str
    named: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> tuple[Function, ...]:
        """The functions the prompt shows: none under `none`."""
        return () if self.choice == "none" else self.functions

    @property
    def forced(self) -> bool:
        """Whether the output must be calls (`required` or a named function)."""
        return self.choice in ("required", "function")

    def allowed(self) -> tuple[Function, ...]:
        """The functions a forced output may call."""
        return tuple(f for f in self.functions if self.named in (None, f.name))


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call as a response carries it: `arguments` is JSON text."""

    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's `tool_calls[]` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _function(i: int, tool: object) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise BadRequest(f"{where} must be an object, got {json_type_name(tool)}")
    if tool.get("type") != "function":
        raise ValidationError(f"{where}.type must be 'function', got {tool.get('type')!r}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise BadRequest(f"{where}.function must be an object, got {json_type_name(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValidationError(f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {name!r}")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise BadRequest(f"{where}.function.description must be a string, got {json_type_name(description)}")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}.function.parameters must be a JSON schema object, got {json_type_name(parameters)}")
    if parameters.get("type", "object") != "object":
        raise ValidationError(f"{where}.function.parameters must describe an object, got type {parameters['type']!r}")
    return Function(name, description, parameters)


def _tool_choice(value: object, names: set[str]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if names else "none"), None
    if isinstance(value, str):
        if value not in CHOICES:
            raise ValidationError(f"tool_choice must be one of {', '.join(CHOICES)} or a function, got {value!r}")
        if value == "required" and not names:
            raise ValidationError("tool_choice 'required' needs tools")
        return value, None
    if not isinstance(value, dict):
        raise BadRequest(f"tool_choice must be a string or an object, got {json_type_name(value)}")
    if value.get("type") != "function":
        raise ValidationError(f"tool_choice.type must be 'function', got {value.get('type')!r}")
    function = value.get("function")
    # The Responses API names the function at the top level.
    name = function.get("name") if isinstance(function, dict) else value.get("name")
    if not isinstance(name, str):
        raise BadRequest("tool_choice must name its function: {'type': 'function', 'function': {'name': ...}}")
    if name not in names:
        raise ValidationError(f"tool_choice names {name!r}, which is not among the tools")
    return "function", name


def parse_tools(body: dict[str, Any]) -> ToolPlan | None:
    """The body's `tools`, `tool_choice` and `parallel_tool_calls`; None without tools and a choice."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise BadRequest(f"tools must be an array, got {json_type_name(tools)}")
    functions = tuple(_function(i, tool) for i, tool in enumerate(tools))
    names = [f.name for f in functions]
    for name in names:
        if names.count(name) > 1:
            raise ValidationError(f"tools: the function name {name!r} is given more than once")
    choice, named = _tool_choice(body.get("tool_choice"), set(names))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest(f"parallel_tool_calls must be a boolean, got {json_type_name(parallel)}")
    if not functions:
        return None
    return ToolPlan(functions, choice, named, parallel is not False)


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


def calls_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON schema of a forced output: one call (or, with `parallel`, an array of one or more) of an
    allowed function, with its `parameters` as the schema of `arguments`."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in plan.allowed()
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if plan.parallel:
        return {"type": "array", "items": call, "minItems": 1}
    return {"type": "array", "items": call, "minItems": 1, "maxItems": 1}


def calls_grammar(plan: ToolPlan, call_token_id: int | None) -> GrammarSpec:
    """The grammar of a forced output: the calls' JSON, after the `[TOOL_CALLS]` token when the template
    has one (`call_token_id`)."""
    schema = calls_schema(plan)
    if call_token_id is None:
        return json_schema_spec("tools", schema)
    inline = {**schema, "x-guidance": JSON_OPTIONS}
    return lark_spec("tools", f'start: <[{call_token_id}]> " "? calls\ncalls: %json {json.dumps(inline)}')


def call_token_id(tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """The id of `[TOOL_CALLS]` when the tokenizer has it as one token."""
    ids = tokenizer.convert_tokens_to_ids([CALL_TOKEN])
    token_id = ids[0] if ids else None
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str, functions: tuple[Function, ...]) -> list[ToolCall] | None:
    """The calls in a model's output (`[TOOL_CALLS]` optional, then a JSON call or array of calls of offered
    functions with object arguments); None when the output is not that."""
    text = text.strip()
    if text.startswith(CALL_TOKEN):
        text = text[len(CALL_TOKEN) :].strip()
    if not text.startswith(("[", "{")):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {f.name for f in functions}
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters"))
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def may_be_calls(text: str) -> bool:
    """Whether an output that begins with `text` could still turn out to be calls (so a stream holds it)."""
    text = text.lstrip()
    return not text or text.startswith(("[", "{")) or CALL_TOKEN.startswith(text[: len(CALL_TOKEN)])


async def fit_to_template(
    plan: ToolPlan | None,
    request: "GenerationRequest",
    params: "GenerationParams",
    tokenizer: "PreTrainedTokenizerBase",
) -> None:
    """Put `plan`'s tools and `request`'s tool turns in the form the chat template takes, and set the grammar of
    a forced call in `params`; every offered function's `parameters` must compile (422 naming the tool)."""
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
