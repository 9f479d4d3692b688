"""The OpenAPI schemas of OpenAI's Responses API (router/api_responses.py): its request, the `response`
object and its stream's typed events.
"""

from mixserve.router.openapi_builders import PRIORITY, Schema, array, obj, typed
from mixserve.router.openapi_openai import OPENAI_SAMPLING, TOOL_CHOICE, TOOL_PARAMETERS

RESPONSES_SCHEMAS: dict[str, Schema] = {
    "ResponsesRequest": obj(
        {
            "input": {
                "oneOf": [
                    typed(
                        "string",
                        "the user's text (may be empty: the instructions and the template still make a prompt)",
                    ),
                    array(
                        {
                            "type": "object",
                            "description": "a message {role, content}, function_call or function_call_output",
                        },
                        minItems=1,
                    ),
                ]
            },
            "instructions": typed("string", "the system prompt"),
            "max_output_tokens": typed("integer", "token limit; default: what fits", minimum=1),
            "temperature": OPENAI_SAMPLING["temperature"],
            "top_p": OPENAI_SAMPLING["top_p"],
            "priority": PRIORITY,
            "model": OPENAI_SAMPLING["model"],
            "stream": typed("boolean", "typed server-sent events", default=False),
            "tools": array(
                obj(
                    {
                        "type": {"const": "function"},
                        "name": typed("string", "the function's name", pattern="^[A-Za-z0-9_-]{1,64}$"),
                        "description": {"type": "string"},
                        "parameters": TOOL_PARAMETERS,
                    },
                    ("type", "name"),
                ),
                "functions the model may call",
            ),
            "tool_choice": {
                "oneOf": [
                    TOOL_CHOICE["oneOf"][0],
                    obj({"type": {"const": "function"}, "name": {"type": "string"}}, ("type", "name")),
                ]
            },
            "parallel_tool_calls": typed("boolean", "allow several calls in one answer", default=True),
            "include": array(
                {"type": "string"},
                "message.output_text.logprobs: the output tokens' logprobs (other values: nothing to include here)",
            ),
            "top_logprobs": typed("integer", "alternatives per output token (asks for logprobs too)", minimum=0),
            "text": obj(
                {
                    "format": {
                        "oneOf": [
                            obj({"type": {"const": "text"}}, ("type",)),
                            obj({"type": {"const": "json_object"}}, ("type",)),
                            obj(
                                {
                                    "type": {"const": "json_schema"},
                                    "name": {"type": "string"},
                                    "schema": {"type": "object"},
                                    "strict": {"type": "boolean"},
                                    "description": {"type": "string"},
                                },
                                ("type", "schema"),
                            ),
                        ],
                        "description": "the output's form: text, any JSON object, or JSON under a schema",
                    }
                }
            ),
        },
        ("input",),
    ),
    "Response": obj(
        {
            "id": typed("string", "response id"),
            "object": {"const": "response"},
            "created_at": typed("integer", "unix time"),
            "status": typed("string", "completed, or incomplete at the token limit", enum=["completed", "incomplete"]),
            "model": typed("string", "the served model"),
            "output": array(
                {"type": "object", "description": "a message (output_text parts) or a function_call (name, arguments)"}
            ),
            "usage": obj({k: {"type": "integer"} for k in ("input_tokens", "output_tokens", "total_tokens")}),
        }
    ),
    "ResponseStreamEvent": obj(
        {
            "type": typed("string", "response.created, response.output_text.delta, ..., response.completed"),
            "sequence_number": {"type": "integer"},
        }
    ),
}
