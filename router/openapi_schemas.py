"""The OpenAPI schemas of the request and response bodies the router serves, by name (`SCHEMAS`; /info's
is in openapi_info.py), and the small builders they are written with. Bounds and defaults come from
the modules that enforce them; router/openapi.py describes the operations that use these schemas.
"""

from typing import Any

from mixserve.router import api_openai as oai
from mixserve.router import api_tgi as tgi
from mixserve.router.params import (
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_BEST_OF,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_SEED,
    MAX_STOP_SEQUENCES,
    MAX_TOP_K,
    MAX_TOP_N_TOKENS,
    GenerationParams,
)

Schema = dict[str, Any]
PREDICT = GenerationParams()


def typed(kind: str, description: str, **extra: Any) -> Schema:
    return {"type": kind, "description": description, **extra}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), description: str = "") -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def array(items: Schema, description: str = "", **extra: Any) -> Schema:
    return {"type": "array", "items": items, **({"description": description} if description else {}), **extra}


def nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        array({"type": "string", "minLength": 1}, maxItems=MAX_STOP_SEQUENCES),
    ],
    "description": "stop sequences: generation ends before the first one produced (not included in the text)",
}
SEED = typed("integer", "seed of the random draws (a seeded request is reproducible)", minimum=0, maximum=MAX_SEED)
PENALTY = {"minimum": -MAX_ABS_PENALTY, "maximum": MAX_ABS_PENALTY, "default": 0.0}
STREAMED = "a stream of server-sent events, each `data: <JSON>` with the schema shown"

OPENAI_SAMPLING: dict[str, Schema] = {
    "model": typed(
        "string",
        "optional; any name is served by the one model (404 with --strict-model-name unless /v1/models lists it)",
    ),
    "temperature": typed("number", "0 is greedy", minimum=0, maximum=oai.MAX_TEMPERATURE, default=1.0),
    "top_p": typed("number", "nucleus sampling mass", exclusiveMinimum=0, maximum=1, default=1.0),
    "top_k": typed("integer", "vLLM extension; 0 or -1 is off", minimum=-1, maximum=MAX_TOP_K, default=0),
    "repetition_penalty": typed("number", "vLLM extension; 1 is off", exclusiveMinimum=0, default=1.0),
    "presence_penalty": typed("number", "subtracted once from every token already generated", **PENALTY),
    "frequency_penalty": typed("number", "subtracted per occurrence in the generated tokens", **PENALTY),
    "stop": STOP,
    "seed": typed("integer", "choice i uses seed + i", minimum=-(2**63), maximum=MAX_SEED),
    "n": typed("integer", "choices per prompt", minimum=1, maximum=oai.MAX_CHOICES, default=1),
    "stream": typed("boolean", "stream chunks as server-sent events ending with `data: [DONE]`", default=False),
    "stream_options": obj(
        {"include_usage": typed("boolean", "a last chunk with `usage` and no choices", default=False)},
        description="only with stream: true",
    ),
    "ignore_eos": typed("boolean", "vLLM extension: keep generating past the EOS token", default=False),
    "min_tokens": typed("integer", "vLLM extension: 0, or equal to the token limit (then ignore_eos)", minimum=0),
    "logit_bias": {
        "type": "object",
        "additionalProperties": {"type": "number", "minimum": -MAX_ABS_LOGIT_BIAS, "maximum": MAX_ABS_LOGIT_BIAS},
        "maxProperties": MAX_LOGIT_BIAS_TOKENS,
        "description": "token id (a decimal string, below the vocabulary size) -> bias added to its logit before "
        "every sample; the logprobs reported are those of the biased logits",
    },
    "response_format": obj(
        {
            "type": typed(
                "string", "text (free), json_object, json_schema", enum=["text", "json_object", "json_schema"]
            ),
            # Read only with type json_schema: then an object with the schema (an object, or it as JSON text).
            "json_schema": {
                "description": "with type json_schema: {name, schema (the JSON schema the output follows), strict}"
            },
        },
        description="constrain the output to JSON; a schema that does not compile is a 422",
    ),
    "guided_json": {"description": "vLLM extension: a JSON schema the output follows (an object, or JSON text)"},
    "guided_regex": typed("string", "vLLM extension: a regex the whole output matches", minLength=1),
    "guided_choice": array({"type": "string", "minLength": 1}, "vLLM extension: the output is one", minItems=1),
    "guided_grammar": typed("string", "vLLM extension: a Lark grammar the output follows", minLength=1),
    "structured_outputs": obj(
        {
            "json": {"description": "a JSON schema (an object, or JSON text)"},
            "regex": {"type": "string"},
            "choice": {"type": "array", "items": {"type": "string"}},
            "grammar": {"type": "string"},
        },
        description="vLLM extension: one of json, regex, choice, grammar (as the guided_* fields)",
    ),
}
GRAMMAR = obj(
    {
        "type": typed("string", "json (value: a JSON schema) or regex (value: the pattern)", enum=["json", "regex"]),
        "value": {"description": "a JSON schema (an object, or JSON text) or a regex the whole output matches"},
    },
    required=("type",),
    description="constrain the output; one that does not compile is a 422",
)
USAGE = obj(
    {
        k: typed("integer", k.replace("_", " "), minimum=0)
        for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
)
FINISH = typed("string", "`stop` (EOS or a stop sequence) or `length`", enum=["stop", "length"])
CHAT_FINISH = typed(
    "string", "`stop`, `length`, or `tool_calls` (the message calls tools)", enum=["stop", "length", "tool_calls"]
)
TOOL_PARAMETERS = {"type": "object", "description": "a JSON schema of an object: the call's arguments"}
TOOL_CHOICE = {
    "oneOf": [
        typed(
            "string",
            "auto (the model decides), none, or required (forced by a grammar)",
            enum=["auto", "none", "required"],
        ),
        obj(
            {"type": {"const": "function"}, "function": obj({"name": {"type": "string"}}, ("name",))},
            ("type", "function"),
            "call this function (forced by a grammar)",
        ),
    ]
}
CALL = obj(
    {
        "id": typed("string", "call id"),
        "type": {"const": "function"},
        "function": obj({"name": {"type": "string"}, "arguments": typed("string", "a JSON object's text")}),
    }
)
OPENAI_HEADER = {
    "id": typed("string", "response id"),
    "object": typed("string", "object kind"),
    "created": typed("integer", "unix time"),
    "model": typed("string", "the served model id"),
}
TGI_PARAMETERS = obj(
    {
        "do_sample": typed("boolean", "sample; without it (and without warpers) decoding is greedy", default=False),
        "max_new_tokens": typed("integer", "token limit", minimum=1, default=tgi.DEFAULT_MAX_NEW_TOKENS),
        "temperature": typed("number", "a value other than 1 turns sampling on", exclusiveMinimum=0),
        "top_k": typed("integer", "turns sampling on", minimum=1, maximum=MAX_TOP_K),
        "top_p": typed("number", "below 1 turns sampling on", exclusiveMinimum=0, maximum=1),
        "typical_p": typed(
            "number", "typical sampling mass; turns sampling on", exclusiveMinimum=0, exclusiveMaximum=1
        ),
        "repetition_penalty": typed("number", "1 is off", exclusiveMinimum=0, default=1.0),
        "frequency_penalty": typed("number", "subtracted per occurrence in the generated tokens", **PENALTY),
        "stop": array({"type": "string", "minLength": 1}, "stop sequences", maxItems=MAX_STOP_SEQUENCES),
        "seed": SEED,
        "details": typed("boolean", "add `details` (tokens, finish reason, seed)", default=False),
        "return_full_text": typed("boolean", "prepend the inputs to generated_text", default=False),
        "decoder_input_details": typed(
            "boolean",
            "score the prompt: details.prefill lists its tokens with their logprobs (null for the first); "
            "not when streaming",
            default=False,
        ),
        "top_n_tokens": typed("integer", "alternatives per token", minimum=0, maximum=MAX_TOP_N_TOKENS, default=0),
        "truncate": typed("integer", "keep only the last N prompt tokens", minimum=1),
        "best_of": typed(
            "integer",
            "sample this many sequences, answer the one of the highest summed logprob (the others in "
            "details.best_of_sequences); above 1 needs sampling, and no seed and no streaming",
            minimum=1,
            maximum=MAX_BEST_OF,
        ),
        "watermark": typed("boolean", "only false is supported", default=False),
        "grammar": GRAMMAR,
    }
)
TGI_TOKEN = obj(
    {
        "id": typed("integer", "token id"),
        "text": typed("string", "the text it adds (a special token's own spelling)"),
        "logprob": typed("number", "log-probability under the model's raw distribution"),
        "special": typed("boolean", "EOS and other special tokens"),
    }
)

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": typed("string", "what went wrong"), "error_type": typed("string", "error kind")}),
    "OpenAIError": obj(
        {
            "error": obj(
                {
                    "message": typed("string", "what went wrong"),
                    "type": typed("string", "invalid_request_error, authentication_error, rate_limit_error, ..."),
                    "param": nullable(typed("string", "the field at fault, when known")),
                    "code": typed("string", "the router's error_type, or model_not_found"),
                }
            ),
            "error_type": typed("string", "the router's error kind"),
        }
    ),
    "PredictRequest": obj(
        {
            "prompt": typed("string", "raw text (give this or messages)", minLength=1),
            "messages": array(ref("ChatMessage"), "a chat, rendered with the model's template", minItems=1),
            "stream": typed("boolean", "chunked text/plain deltas; false: one JSON object", default=PREDICT.stream),
            "max_tokens": typed(
                "integer", "token limit (alias max_new_tokens)", minimum=1, default=PREDICT.max_new_tokens
            ),
            "max_new_tokens": typed("integer", "token limit", minimum=1, default=PREDICT.max_new_tokens),
            "temperature": typed("number", "0 is greedy", minimum=0, default=PREDICT.temperature),
            "top_p": typed("number", "nucleus mass", exclusiveMinimum=0, maximum=1, default=PREDICT.top_p),
            "top_k": typed("integer", "0 is off", minimum=0, maximum=MAX_TOP_K, default=PREDICT.top_k),
            "repetition_penalty": typed("number", "1 is off", exclusiveMinimum=0, default=1.0),
            "stop": STOP,
            "seed": SEED,
            "grammar": GRAMMAR,
            "response_format": OPENAI_SAMPLING["response_format"],
        }
    )
    # Exactly one of the two (a null one counts as left out): the server refuses both or neither (422).
    | {
        "oneOf": [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        ]
    },
    "PredictResponse": obj(
        {
            "output": typed("string", "the generated text"),
            "finish_reason": typed("string", "why it ended", enum=["length", "eos_token", "stop_sequence"]),
            "prompt_tokens": typed("integer", "prompt length in tokens"),
            "generated_tokens": typed("integer", "tokens generated"),
        }
    ),
    "ChatMessage": obj(
        {
            "role": typed("string", "system, user, assistant or tool (developer counts as system)", minLength=1),
            "content": {
                "oneOf": [
                    {"type": "string"},
                    array(obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))),
                    {"type": "null"},
                ],
                "description": "text, or text parts (joined by newlines); null only for an assistant's tool calls",
            },
            "tool_calls": array(CALL, "an assistant's calls (arguments a JSON object's text)"),
            "tool_call_id": typed("string", "a tool message: the id of the call it answers"),
        },
        ("role",),
    ),
    "Tool": obj(
        {
            "type": {"const": "function"},
            "function": obj(
                {
                    "name": typed("string", "the function's name", pattern="^[A-Za-z0-9_-]{1,64}$"),
                    "description": {"type": "string"},
                    "parameters": TOOL_PARAMETERS,
                },
                ("name",),
            ),
        },
        ("type", "function"),
    ),
    "ChatCompletionRequest": obj(
        {
            "messages": array(ref("ChatMessage"), "the conversation", minItems=1),
            "max_completion_tokens": typed("integer", "token limit per choice; default: what fits", minimum=1),
            "max_tokens": typed("integer", "older name of max_completion_tokens", minimum=1),
            "logprobs": typed("boolean", "return each token's logprob", default=False),
            "top_logprobs": typed("integer", "alternatives per token", minimum=0, maximum=oai.MAX_CHAT_TOP_LOGPROBS),
            "tools": array(ref("Tool"), "functions the model may call"),
            "tool_choice": TOOL_CHOICE,
            "parallel_tool_calls": typed("boolean", "allow several calls in one answer", default=True),
            **OPENAI_SAMPLING,
        },
        ("messages",),
    ),
    "ChatCompletion": obj(
        {
            **OPENAI_HEADER,
            "choices": array(
                obj(
                    {
                        "index": typed("integer", "choice index"),
                        "message": obj(
                            {
                                "role": {"const": "assistant"},
                                "content": nullable({"type": "string"}),
                                "tool_calls": array(CALL),
                            }
                        ),
                        "logprobs": nullable(obj({"content": array(ref("TokenLogprob"))})),
                        "finish_reason": CHAT_FINISH,
                    }
                )
            ),
            "usage": USAGE,
        }
    ),
    "ChatCompletionChunk": obj(
        {
            **OPENAI_HEADER,
            "choices": array(
                obj(
                    {
                        "index": typed("integer", "choice index"),
                        "delta": obj(
                            {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                                "tool_calls": array(
                                    obj({"index": {"type": "integer"}, "id": {"type": "string"}}),
                                    "a call's id, type and name first, then its arguments' text",
                                ),
                            }
                        ),
                        "logprobs": nullable(obj({"content": array(ref("TokenLogprob"))})),
                        "finish_reason": nullable(CHAT_FINISH),
                    }
                ),
                "one choice per chunk; empty on the usage chunk",
            ),
            "usage": nullable(USAGE),
        }
    ),
    "ResponsesRequest": obj(
        {
            "input": {
                "oneOf": [
                    typed("string", "the user's text", minLength=1),
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
    "TokenLogprob": obj(
        {
            "token": typed("string", "token text"),
            "logprob": typed("number", "log-probability"),
            "bytes": array({"type": "integer"}),
            "top_logprobs": array(obj({"token": {"type": "string"}, "logprob": {"type": "number"}})),
        }
    ),
    "CompletionRequest": obj(
        {
            "prompt": {
                "oneOf": [{"type": "string", "minLength": 1}, array({"type": "string", "minLength": 1}, minItems=1)],
                "description": "one prompt, or several (n choices each); token ids are not accepted",
            },
            "max_tokens": typed("integer", "token limit per choice", minimum=1, default=oai.COMPLETIONS_MAX_TOKENS),
            "logprobs": typed("integer", "alternatives per token", minimum=0, maximum=oai.MAX_COMPLETION_LOGPROBS),
            "best_of": typed("integer", "must equal n when given", minimum=1),
            "echo": typed(
                "boolean",
                "the prompt before each choice's text (streamed: in its first chunk); with logprobs, its tokens "
                "and their logprobs first",
                default=False,
            ),
            **OPENAI_SAMPLING,
        },
        ("prompt",),
    ),
    "Completion": obj(
        {
            **OPENAI_HEADER,
            "choices": array(
                obj(
                    {
                        "index": typed("integer", "prompt index x n + choice"),
                        "text": typed("string", "generated text (a delta when streaming)"),
                        "logprobs": nullable(
                            obj(
                                {
                                    k: {"type": "array"}
                                    for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
                                }
                            )
                        ),
                        "finish_reason": nullable(FINISH),
                    }
                )
            ),
            "usage": nullable(USAGE),
        }
    ),
    "Model": obj(
        {
            "id": typed("string", "model id"),
            "object": {"const": "model"},
            "created": typed("integer", "unix time the server started"),
            "owned_by": typed("string", "owner"),
            "max_model_len": typed("integer", "max_total_tokens"),
        }
    ),
    "ModelList": obj({"object": {"const": "list"}, "data": array(ref("Model"))}),
    "GenerateRequest": obj(
        {"inputs": typed("string", "prompt text (BOS is added)", minLength=1), "parameters": ref("GenerateParameters")},
        ("inputs",),
    ),
    "CompatGenerateRequest": obj(
        {
            "inputs": typed("string", "prompt text (BOS is added)", minLength=1),
            "parameters": ref("GenerateParameters"),
            "stream": typed("boolean", "answer as /generate_stream", default=False),
        },
        ("inputs",),
    ),
    "GenerateParameters": TGI_PARAMETERS,
    "Token": TGI_TOKEN,
    "GenerateResponse": obj(
        {
            "generated_text": typed("string", "the text (with the inputs first when return_full_text)"),
            "details": obj(
                {
                    "finish_reason": typed("string", "why it ended", enum=["length", "eos_token", "stop_sequence"]),
                    "generated_tokens": typed("integer", "tokens generated"),
                    "seed": nullable(typed("integer", "the seed used, when sampling")),
                    "prefill": array(
                        obj(
                            {
                                "id": {"type": "integer"},
                                "text": {"type": "string"},
                                "logprob": {"type": ["number", "null"]},
                            }
                        )
                    ),
                    "tokens": array(ref("Token")),
                    "top_tokens": array(array(ref("Token"))),
                    "best_of_sequences": array(
                        {"type": "object", "description": "generated_text and the fields above, for each other one"},
                        "with best_of > 1: the other sequences, best first",
                    ),
                    "speculative_proposed": typed("integer", "tokens speculation proposed (0 without --speculate)"),
                    "speculative_accepted": typed("integer", "proposed tokens that became output"),
                },
                description="present when parameters.details is true",
            ),
        },
        ("generated_text",),
    ),
    "StreamResponse": obj(
        {
            "index": typed("integer", "1 for the first token"),
            "token": ref("Token"),
            "top_tokens": array(ref("Token")),
            "generated_text": nullable(typed("string", "the whole text, on the last event only")),
            "details": nullable(
                obj(
                    {
                        "finish_reason": {"type": "string"},
                        "generated_tokens": {"type": "integer"},
                        "seed": {"type": ["integer", "null"]},
                        "input_length": {"type": "integer"},
                        "speculative_proposed": {"type": "integer"},
                        "speculative_accepted": {"type": "integer"},
                    },
                    description="on the last event, when parameters.details is true",
                )
            ),
        }
    ),
    "TokenizeRequest": obj({"inputs": typed("string", "text to tokenize (BOS is added)", minLength=1)}, ("inputs",)),
    "SimpleToken": obj(
        {
            "id": typed("integer", "token id"),
            "text": typed("string", "the span of inputs it covers"),
            "start": typed("integer", "first character"),
            "stop": typed("integer", "one past the last character"),
        }
    ),
}


def _null_means_left_out(schema: Schema) -> None:
    """Let every optional field of a request body be null, as the parsers read a null as a field left out.
    Fields are replaced, not changed: several bodies share one field's schema."""
    properties = schema["properties"]
    for name, field in properties.items():
        if name in schema.get("required", ()) or field.get("type") == "null":
            continue
        if "$ref" in field:
            properties[name] = {"anyOf": [field, {"type": "null"}]}
        elif "oneOf" in field:
            properties[name] = {**field, "oneOf": [*field["oneOf"], {"type": "null"}]}
        elif "type" in field:  # a field of any type (no "type") takes null already
            properties[name] = {**field, "type": [field["type"], "null"]}


for _body_schema in (
    "PredictRequest",
    "ChatCompletionRequest",
    "CompletionRequest",
    "GenerateRequest",
    "ResponsesRequest",
    "CompatGenerateRequest",
    "GenerateParameters",
):
    _null_means_left_out(SCHEMAS[_body_schema])
