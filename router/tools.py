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

The conversation's tool turns and the prompt are router/tool_turns.py; this module reads the tools and
the choice, builds the grammar of a forced call and parses the model's calls.

`tool_choice`: `required` and a named function constrain the output with a JSON-schema grammar (calls whose
`name` is one of the allowed functions and whose `arguments` follow that function's `parameters`, an array
of one or more when `parallel_tool_calls`, else one call), so the arguments always parse and validate.
`auto` offers the tools and leaves the output free: an answer that parses as calls of offered functions is
a tool call, anything else is content (the model decides, as it would on OpenAI; a constrained "call or
content" JSON would make every plain answer a JSON string). Where the template has the `[TOOL_CALLS]` token,
`auto`'s grammar is free text or that token and calls as `required`'s: the model still decides, and a call
it begins has valid arguments (without the token a call begins as text does, so it stays free). `none`
offers no tools.
"""

import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mixserve.router.errors import BadRequest, ValidationError, json_type_name
from mixserve.router.fields import as_bool
from mixserve.router.structured import JSON_OPTIONS, GrammarSpec, json_schema_spec, lark_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# OpenAI's rule for function names.
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHOICES = ("auto", "none", "required")
CALL_TOKEN = "[TOOL_CALLS]"
# A function without `parameters` takes none.
NO_PARAMETERS = {"type": "object", "properties": {}}


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
    parallel = as_bool("parallel_tool_calls", body.get("parallel_tool_calls"), default=True)
    if not functions:
        return None
    return ToolPlan(functions, choice, named, parallel)


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
    has one (`call_token_id`). Under `auto` (with the token only): free text (no special token but the end
    of sequence), or the token and calls, so that a call the model begins is a valid one."""
    schema = calls_schema(plan)
    if call_token_id is None:
        if not plan.forced:
            raise ValueError("auto's grammar needs the call token: without it the output stays free")
        return json_schema_spec("tools", schema)
    inline = {**schema, "x-guidance": JSON_OPTIONS}
    calls = f'<[{call_token_id}]> " "? calls\ncalls: %json {json.dumps(inline)}'
    if plan.forced:
        return lark_spec("tools", f"start: {calls}")
    return lark_spec("tools", f"start: free | {calls}\nfree: /(?s:.*)/")


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
