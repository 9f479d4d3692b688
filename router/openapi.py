"""`GET /openapi.json` (OpenAPI 3.1) and `GET /docs` (the same spec as one self-contained HTML page).

Operations are described here, keyed by method and route template; the spec lists the routes the
app actually serves (so a flag that adds or removes a route changes the spec with it). A route
without a description here is missing from the spec, which the tests catch. HEAD is answered for
every GET and not listed separately. Bounds and defaults come from the modules that enforce them.
"""

import copy
import html
import json
from typing import Any

from aiohttp import web

from mixserve.router import api_openai as oai
from mixserve.router import api_tgi as tgi
from mixserve.router.http_common import CONFIG
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
    RequestLimits,
)

Schema = dict[str, Any]
PREDICT = GenerationParams()


def _t(kind: str, description: str, **extra: Any) -> Schema:
    return {"type": kind, "description": description, **extra}


def _obj(properties: dict[str, Schema], required: tuple[str, ...] = (), description: str = "") -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(items: Schema, description: str = "", **extra: Any) -> Schema:
    return {"type": "array", "items": items, **({"description": description} if description else {}), **extra}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        _array({"type": "string", "minLength": 1}, maxItems=MAX_STOP_SEQUENCES),
    ],
    "description": "stop sequences: generation ends before the first one produced (not included in the text)",
}
SEED = _t("integer", "seed of the random draws (a seeded request is reproducible)", minimum=0, maximum=MAX_SEED)
PENALTY = {"minimum": -MAX_ABS_PENALTY, "maximum": MAX_ABS_PENALTY, "default": 0.0}
STREAMED = "a stream of server-sent events, each `data: <JSON>` with the schema shown"

OPENAI_SAMPLING: dict[str, Schema] = {
    "model": _t(
        "string",
        "optional; any name is served by the one model (404 with --strict-model-name unless /v1/models lists it)",
    ),
    "temperature": _t("number", "0 is greedy", minimum=0, maximum=oai.MAX_TEMPERATURE, default=1.0),
    "top_p": _t("number", "nucleus sampling mass", exclusiveMinimum=0, maximum=1, default=1.0),
    "top_k": _t("integer", "vLLM extension; 0 or -1 is off", minimum=-1, maximum=MAX_TOP_K, default=0),
    "repetition_penalty": _t("number", "vLLM extension; 1 is off", exclusiveMinimum=0, default=1.0),
    "presence_penalty": _t("number", "subtracted once from every token already generated", **PENALTY),
    "frequency_penalty": _t("number", "subtracted per occurrence in the generated tokens", **PENALTY),
    "stop": STOP,
    "seed": _t("integer", "choice i uses seed + i", minimum=-(2**63), maximum=MAX_SEED),
    "n": _t("integer", "choices per prompt", minimum=1, maximum=oai.MAX_CHOICES, default=1),
    "stream": _t("boolean", "stream chunks as server-sent events ending with `data: [DONE]`", default=False),
    "stream_options": _obj(
        {"include_usage": _t("boolean", "a last chunk with `usage` and no choices", default=False)},
        description="only with stream: true",
    ),
    "ignore_eos": _t("boolean", "vLLM extension: keep generating past the EOS token", default=False),
    "min_tokens": _t("integer", "vLLM extension: 0, or equal to the token limit (then ignore_eos)", minimum=0),
    "logit_bias": {
        "type": "object",
        "additionalProperties": {"type": "number", "minimum": -MAX_ABS_LOGIT_BIAS, "maximum": MAX_ABS_LOGIT_BIAS},
        "maxProperties": MAX_LOGIT_BIAS_TOKENS,
        "description": "token id (a decimal string, below the vocabulary size) -> bias added to its logit before "
        "every sample; the logprobs reported are those of the biased logits",
    },
    "response_format": _obj(
        {
            "type": _t("string", "text (free), json_object, json_schema", enum=["text", "json_object", "json_schema"]),
            # Read only with type json_schema: then an object with the schema (an object, or it as JSON text).
            "json_schema": {
                "description": "with type json_schema: {name, schema (the JSON schema the output follows), strict}"
            },
        },
        description="constrain the output to JSON; a schema that does not compile is a 422",
    ),
    "guided_json": {"description": "vLLM extension: a JSON schema the output follows (an object, or JSON text)"},
    "guided_regex": _t("string", "vLLM extension: a regex the whole output matches", minLength=1),
    "guided_choice": _array({"type": "string", "minLength": 1}, "vLLM extension: the output is one", minItems=1),
    "guided_grammar": _t("string", "vLLM extension: a Lark grammar the output follows", minLength=1),
    "structured_outputs": _obj(
        {
            "json": {"description": "a JSON schema (an object, or JSON text)"},
            "regex": {"type": "string"},
            "choice": {"type": "array", "items": {"type": "string"}},
            "grammar": {"type": "string"},
        },
        description="vLLM extension: one of json, regex, choice, grammar (as the guided_* fields)",
    ),
}
GRAMMAR = _obj(
    {
        "type": _t("string", "json (value: a JSON schema) or regex (value: the pattern)", enum=["json", "regex"]),
        "value": {"description": "a JSON schema (an object, or JSON text) or a regex the whole output matches"},
    },
    required=("type",),
    description="constrain the output; one that does not compile is a 422",
)
USAGE = _obj(
    {k: _t("integer", k.replace("_", " "), minimum=0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
)
FINISH = _t("string", "`stop` (EOS or a stop sequence) or `length`", enum=["stop", "length"])
CHAT_FINISH = _t(
    "string", "`stop`, `length`, or `tool_calls` (the message calls tools)", enum=["stop", "length", "tool_calls"]
)
TOOL_PARAMETERS = {"type": "object", "description": "a JSON schema of an object: the call's arguments"}
TOOL_CHOICE = {
    "oneOf": [
        _t(
            "string",
            "auto (the model decides), none, or required (forced by a grammar)",
            enum=["auto", "none", "required"],
        ),
        _obj(
            {"type": {"const": "function"}, "function": _obj({"name": {"type": "string"}}, ("name",))},
            ("type", "function"),
            "call this function (forced by a grammar)",
        ),
    ]
}
CALL = _obj(
    {
        "id": _t("string", "call id"),
        "type": {"const": "function"},
        "function": _obj({"name": {"type": "string"}, "arguments": _t("string", "a JSON object's text")}),
    }
)
OPENAI_HEADER = {
    "id": _t("string", "response id"),
    "object": _t("string", "object kind"),
    "created": _t("integer", "unix time"),
    "model": _t("string", "the served model id"),
}
TGI_PARAMETERS = _obj(
    {
        "do_sample": _t("boolean", "sample; without it (and without warpers) decoding is greedy", default=False),
        "max_new_tokens": _t("integer", "token limit", minimum=1, default=tgi.DEFAULT_MAX_NEW_TOKENS),
        "temperature": _t("number", "a value other than 1 turns sampling on", exclusiveMinimum=0),
        "top_k": _t("integer", "turns sampling on", minimum=1, maximum=MAX_TOP_K),
        "top_p": _t("number", "below 1 turns sampling on", exclusiveMinimum=0, maximum=1),
        "typical_p": _t("number", "typical sampling mass; turns sampling on", exclusiveMinimum=0, exclusiveMaximum=1),
        "repetition_penalty": _t("number", "1 is off", exclusiveMinimum=0, default=1.0),
        "frequency_penalty": _t("number", "subtracted per occurrence in the generated tokens", **PENALTY),
        "stop": _array({"type": "string", "minLength": 1}, "stop sequences", maxItems=MAX_STOP_SEQUENCES),
        "seed": SEED,
        "details": _t("boolean", "add `details` (tokens, finish reason, seed)", default=False),
        "return_full_text": _t("boolean", "prepend the inputs to generated_text", default=False),
        "decoder_input_details": _t(
            "boolean",
            "score the prompt: details.prefill lists its tokens with their logprobs (null for the first); "
            "not when streaming",
            default=False,
        ),
        "top_n_tokens": _t("integer", "alternatives per token", minimum=0, maximum=MAX_TOP_N_TOKENS, default=0),
        "truncate": _t("integer", "keep only the last N prompt tokens", minimum=1),
        "best_of": _t(
            "integer",
            "sample this many sequences, answer the one of the highest summed logprob (the others in "
            "details.best_of_sequences); above 1 needs sampling, and no seed and no streaming",
            minimum=1,
            maximum=MAX_BEST_OF,
        ),
        "watermark": _t("boolean", "only false is supported", default=False),
        "grammar": GRAMMAR,
    }
)
TGI_TOKEN = _obj(
    {
        "id": _t("integer", "token id"),
        "text": _t("string", "the text it adds (a special token's own spelling)"),
        "logprob": _t("number", "log-probability under the model's raw distribution"),
        "special": _t("boolean", "EOS and other special tokens"),
    }
)

SCHEMAS: dict[str, Schema] = {
    "Error": _obj({"error": _t("string", "what went wrong"), "error_type": _t("string", "error kind")}),
    "OpenAIError": _obj(
        {
            "error": _obj(
                {
                    "message": _t("string", "what went wrong"),
                    "type": _t("string", "invalid_request_error, authentication_error, rate_limit_error, ..."),
                    "param": _nullable(_t("string", "the field at fault, when known")),
                    "code": _t("string", "the router's error_type, or model_not_found"),
                }
            ),
            "error_type": _t("string", "the router's error kind"),
        }
    ),
    "PredictRequest": _obj(
        {
            "prompt": _t("string", "raw text (give this or messages)", minLength=1),
            "messages": _array(_ref("ChatMessage"), "a chat, rendered with the model's template", minItems=1),
            "stream": _t("boolean", "chunked text/plain deltas; false: one JSON object", default=PREDICT.stream),
            "max_tokens": _t(
                "integer", "token limit (alias max_new_tokens)", minimum=1, default=PREDICT.max_new_tokens
            ),
            "max_new_tokens": _t("integer", "token limit", minimum=1, default=PREDICT.max_new_tokens),
            "temperature": _t("number", "0 is greedy", minimum=0, default=PREDICT.temperature),
            "top_p": _t("number", "nucleus mass", exclusiveMinimum=0, maximum=1, default=PREDICT.top_p),
            "top_k": _t("integer", "0 is off", minimum=0, maximum=MAX_TOP_K, default=PREDICT.top_k),
            "repetition_penalty": _t("number", "1 is off", exclusiveMinimum=0, default=1.0),
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
    "PredictResponse": _obj(
        {
            "output": _t("string", "the generated text"),
            "finish_reason": _t("string", "why it ended", enum=["length", "eos_token", "stop_sequence"]),
            "prompt_tokens": _t("integer", "prompt length in tokens"),
            "generated_tokens": _t("integer", "tokens generated"),
        }
    ),
    "ChatMessage": _obj(
        {
            "role": _t("string", "system, user, assistant or tool (developer counts as system)", minLength=1),
            "content": {
                "oneOf": [
                    {"type": "string"},
                    _array(_obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))),
                    {"type": "null"},
                ],
                "description": "text, or text parts (joined by newlines); null only for an assistant's tool calls",
            },
            "tool_calls": _array(CALL, "an assistant's calls (arguments a JSON object's text)"),
            "tool_call_id": _t("string", "a tool message: the id of the call it answers"),
        },
        ("role",),
    ),
    "Tool": _obj(
        {
            "type": {"const": "function"},
            "function": _obj(
                {
                    "name": _t("string", "the function's name", pattern="^[A-Za-z0-9_-]{1,64}$"),
                    "description": {"type": "string"},
                    "parameters": TOOL_PARAMETERS,
                },
                ("name",),
            ),
        },
        ("type", "function"),
    ),
    "ChatCompletionRequest": _obj(
        {
            "messages": _array(_ref("ChatMessage"), "the conversation", minItems=1),
            "max_completion_tokens": _t("integer", "token limit per choice; default: what fits", minimum=1),
            "max_tokens": _t("integer", "older name of max_completion_tokens", minimum=1),
            "logprobs": _t("boolean", "return each token's logprob", default=False),
            "top_logprobs": _t("integer", "alternatives per token", minimum=0, maximum=oai.MAX_CHAT_TOP_LOGPROBS),
            "tools": _array(_ref("Tool"), "functions the model may call"),
            "tool_choice": TOOL_CHOICE,
            "parallel_tool_calls": _t("boolean", "allow several calls in one answer", default=True),
            **OPENAI_SAMPLING,
        },
        ("messages",),
    ),
    "ChatCompletion": _obj(
        {
            **OPENAI_HEADER,
            "choices": _array(
                _obj(
                    {
                        "index": _t("integer", "choice index"),
                        "message": _obj(
                            {
                                "role": {"const": "assistant"},
                                "content": _nullable({"type": "string"}),
                                "tool_calls": _array(CALL),
                            }
                        ),
                        "logprobs": _nullable(_obj({"content": _array(_ref("TokenLogprob"))})),
                        "finish_reason": CHAT_FINISH,
                    }
                )
            ),
            "usage": USAGE,
        }
    ),
    "ChatCompletionChunk": _obj(
        {
            **OPENAI_HEADER,
            "choices": _array(
                _obj(
                    {
                        "index": _t("integer", "choice index"),
                        "delta": _obj(
                            {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                                "tool_calls": _array(
                                    _obj({"index": {"type": "integer"}, "id": {"type": "string"}}),
                                    "a call's id, type and name first, then its arguments' text",
                                ),
                            }
                        ),
                        "logprobs": _nullable(_obj({"content": _array(_ref("TokenLogprob"))})),
                        "finish_reason": _nullable(CHAT_FINISH),
                    }
                ),
                "one choice per chunk; empty on the usage chunk",
            ),
            "usage": _nullable(USAGE),
        }
    ),
    "ResponsesRequest": _obj(
        {
            "input": {
                "oneOf": [
                    _t("string", "the user's text", minLength=1),
                    _array(
                        {
                            "type": "object",
                            "description": "a message {role, content}, function_call or function_call_output",
                        },
                        minItems=1,
                    ),
                ]
            },
            "instructions": _t("string", "the system prompt"),
            "max_output_tokens": _t("integer", "token limit; default: what fits", minimum=1),
            "temperature": OPENAI_SAMPLING["temperature"],
            "top_p": OPENAI_SAMPLING["top_p"],
            "model": OPENAI_SAMPLING["model"],
            "stream": _t("boolean", "typed server-sent events", default=False),
            "tools": _array(
                _obj(
                    {
                        "type": {"const": "function"},
                        "name": _t("string", "the function's name", pattern="^[A-Za-z0-9_-]{1,64}$"),
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
                    _obj({"type": {"const": "function"}, "name": {"type": "string"}}, ("type", "name")),
                ]
            },
            "parallel_tool_calls": _t("boolean", "allow several calls in one answer", default=True),
        },
        ("input",),
    ),
    "Response": _obj(
        {
            "id": _t("string", "response id"),
            "object": {"const": "response"},
            "created_at": _t("integer", "unix time"),
            "status": _t("string", "completed, or incomplete at the token limit", enum=["completed", "incomplete"]),
            "model": _t("string", "the served model"),
            "output": _array(
                {"type": "object", "description": "a message (output_text parts) or a function_call (name, arguments)"}
            ),
            "usage": _obj({k: {"type": "integer"} for k in ("input_tokens", "output_tokens", "total_tokens")}),
        }
    ),
    "ResponseStreamEvent": _obj(
        {
            "type": _t("string", "response.created, response.output_text.delta, ..., response.completed"),
            "sequence_number": {"type": "integer"},
        }
    ),
    "TokenLogprob": _obj(
        {
            "token": _t("string", "token text"),
            "logprob": _t("number", "log-probability"),
            "bytes": _array({"type": "integer"}),
            "top_logprobs": _array(_obj({"token": {"type": "string"}, "logprob": {"type": "number"}})),
        }
    ),
    "CompletionRequest": _obj(
        {
            "prompt": {
                "oneOf": [{"type": "string", "minLength": 1}, _array({"type": "string", "minLength": 1}, minItems=1)],
                "description": "one prompt, or several (n choices each); token ids are not accepted",
            },
            "max_tokens": _t("integer", "token limit per choice", minimum=1, default=oai.COMPLETIONS_MAX_TOKENS),
            "logprobs": _t("integer", "alternatives per token", minimum=0, maximum=oai.MAX_COMPLETION_LOGPROBS),
            "best_of": _t("integer", "must equal n when given", minimum=1),
            "echo": _t(
                "boolean",
                "the prompt before each choice's text (streamed: in its first chunk); with logprobs, its tokens "
                "and their logprobs first",
                default=False,
            ),
            **OPENAI_SAMPLING,
        },
        ("prompt",),
    ),
    "Completion": _obj(
        {
            **OPENAI_HEADER,
            "choices": _array(
                _obj(
                    {
                        "index": _t("integer", "prompt index x n + choice"),
                        "text": _t("string", "generated text (a delta when streaming)"),
                        "logprobs": _nullable(
                            _obj(
                                {
                                    k: {"type": "array"}
                                    for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
                                }
                            )
                        ),
                        "finish_reason": _nullable(FINISH),
                    }
                )
            ),
            "usage": _nullable(USAGE),
        }
    ),
    "Model": _obj(
        {
            "id": _t("string", "model id"),
            "object": {"const": "model"},
            "created": _t("integer", "unix time the server started"),
            "owned_by": _t("string", "owner"),
            "max_model_len": _t("integer", "max_total_tokens"),
        }
    ),
    "ModelList": _obj({"object": {"const": "list"}, "data": _array(_ref("Model"))}),
    "GenerateRequest": _obj(
        {"inputs": _t("string", "prompt text (BOS is added)", minLength=1), "parameters": _ref("GenerateParameters")},
        ("inputs",),
    ),
    "CompatGenerateRequest": _obj(
        {
            "inputs": _t("string", "prompt text (BOS is added)", minLength=1),
            "parameters": _ref("GenerateParameters"),
            "stream": _t("boolean", "answer as /generate_stream", default=False),
        },
        ("inputs",),
    ),
    "GenerateParameters": TGI_PARAMETERS,
    "Token": TGI_TOKEN,
    "GenerateResponse": _obj(
        {
            "generated_text": _t("string", "the text (with the inputs first when return_full_text)"),
            "details": _obj(
                {
                    "finish_reason": _t("string", "why it ended", enum=["length", "eos_token", "stop_sequence"]),
                    "generated_tokens": _t("integer", "tokens generated"),
                    "seed": _nullable(_t("integer", "the seed used, when sampling")),
                    "prefill": _array(
                        _obj(
                            {
                                "id": {"type": "integer"},
                                "text": {"type": "string"},
                                "logprob": {"type": ["number", "null"]},
                            }
                        )
                    ),
                    "tokens": _array(_ref("Token")),
                    "top_tokens": _array(_array(_ref("Token"))),
                    "best_of_sequences": _array(
                        {"type": "object", "description": "generated_text and the fields above, for each other one"},
                        "with best_of > 1: the other sequences, best first",
                    ),
                    "speculative_proposed": _t("integer", "tokens speculation proposed (0 without --speculate)"),
                    "speculative_accepted": _t("integer", "proposed tokens that became output"),
                },
                description="present when parameters.details is true",
            ),
        },
        ("generated_text",),
    ),
    "StreamResponse": _obj(
        {
            "index": _t("integer", "1 for the first token"),
            "token": _ref("Token"),
            "top_tokens": _array(_ref("Token")),
            "generated_text": _nullable(_t("string", "the whole text, on the last event only")),
            "details": _nullable(
                _obj(
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
    "TokenizeRequest": _obj({"inputs": _t("string", "text to tokenize (BOS is added)", minLength=1)}, ("inputs",)),
    "SimpleToken": _obj(
        {
            "id": _t("integer", "token id"),
            "text": _t("string", "the span of inputs it covers"),
            "start": _t("integer", "first character"),
            "stop": _t("integer", "one past the last character"),
        }
    ),
    "Info": _obj(
        {
            "model_id": _t("string", "the checkpoint as passed to --model"),
            "model_dtype": _t("string", "shard weight dtype"),
            "num_shard": _t("integer", "tensor-parallel shards"),
            "quantize": _nullable(_t("string", "quantization mode of the shards (--quantize; null: none)")),
            "weight_bytes_per_shard": _t("integer", "bytes of weights rank 0 holds, quantization state included"),
            "weights": _t("string", "random (the demo, --load-format dummy: text means nothing) or checkpoint"),
            "memory": _obj(
                {
                    "weight_bytes": _t("integer", "weights on rank 0"),
                    "kv_cache_bytes": _t("integer", "its KV cache"),
                    "block_bytes": _t("integer", "one KV block over all layers"),
                    "peak_activation_bytes": _t("integer", "peak of the worst-case steps, measured at Warmup"),
                    "headroom_bytes": _t("integer", "kept free besides that peak"),
                    "free_bytes": _t("integer", "free memory when the cache was sized (CPU: the KV budget)"),
                    "max_batch_tokens": _t("integer", "worst case measured: tokens in a step"),
                    "max_batch_size": _t("integer", "worst case measured: sequences in a step"),
                    "max_context_tokens": _t("integer", "worst case measured: longest context"),
                },
                description="how rank 0 sized its KV cache (shard.proto MemoryReport)",
            ),
            "kernels": _obj(
                {
                    "backends": {
                        "type": "object",
                        "additionalProperties": {"enum": ["native", "triton", "torch"]},
                        "description": "each op's backend: native (the C kernels), triton or torch",
                    },
                    "vector_floats": _t(
                        "integer", "the C kernels' vector width in floats: 16 AVX-512, 8 AVX2, 1 plain C, 0 not run"
                    ),
                    "bf16_dot_products": _t(
                        "boolean",
                        "the model's bf16 weights meet their inputs rounded to bf16 in the CPU's bf16 dot product "
                        "(false for other dtypes)",
                    ),
                },
                description="which kernels rank 0 runs (chosen at start-up; shard.proto KernelsReport)",
            ),
            "version": _t("string", "mixserve version"),
            "max_concurrent_requests": _t("integer", "queued + running requests before 429"),
            "max_input_tokens": _t("integer", "longest prompt"),
            "max_total_tokens": _t("integer", "prompt + new tokens"),
            "max_batch_prefill_tokens": _t("integer", "prompt tokens per step"),
            "max_batch_total_tokens": _nullable(_t("integer", "KV tokens the running batch may hold (null: all)")),
            "block_size": _t("integer", "KV tokens per block"),
            "kv_blocks_total": _t("integer", "KV cache blocks"),
            "kv_blocks_used": _t("integer", "blocks held by requests now"),
            "kv_blocks_free": _t("integer", "blocks free now"),
            "kv_blocks_cached": _t("integer", "free blocks still holding a cached prompt prefix"),
            "prefix_caching": _t("boolean", "whether prompt prefixes are reused"),
            "prefix_cache_query_tokens": _t("integer", "prompt tokens looked up in the prefix cache"),
            "prefix_cache_hit_tokens": _t("integer", "prompt tokens found there (not recomputed)"),
            "requests_waiting": _t("integer", "queued now"),
            "requests_running": _t("integer", "in the running batch now"),
            "steps": _t("integer", "shard steps run"),
            "step_sequences": _t("integer", "sequences over all steps"),
            "generated_tokens": _t("integer", "tokens generated"),
            "cancelled_requests": _t("integer", "requests whose client left"),
            "speculate": _t("integer", "tokens proposed per decode by speculation (0: off)"),
            "speculative_model": _nullable(
                _t("string", "the draft model's checkpoint (--speculative-model; null: n-gram proposals)")
            ),
            "speculative_proposed_tokens": _t("integer", "tokens proposed since start"),
            "speculative_accepted_tokens": _t("integer", "proposed tokens that became output"),
            "uptime_s": _t("number", "seconds since start"),
            "shard_groups": _array(
                _obj(
                    {
                        "group": _t("integer", "group index (--replicas order, or --shard-group order)"),
                        "status": {"enum": ["serving", "restarting", "down"]},
                        "error": _nullable(_t("string", "why the group is down")),
                        "restarts": _t("integer", "times the group was restarted"),
                        "last_failure": _nullable(_t("string", "why the group last failed (null: never)")),
                        "num_shard": _t("integer", "shards of the group"),
                        "requests_routed": _t("integer", "requests sent to the group"),
                        "requests_waiting": _t("integer", "queued on the group now"),
                        "requests_running": _t("integer", "in the group's running batch now"),
                        "kv_blocks_total": _t("integer", "KV cache blocks of the group"),
                        "kv_blocks_free": _t("integer", "of them free now"),
                        "steps": _t("integer", "shard steps the group ran"),
                        "generated_tokens": _t("integer", "tokens the group generated"),
                    }
                ),
                "every shard group behind this router; the counters above sum over them",
            ),
            "model_sha": {"type": "null", "description": "TGI field; unknown"},
            "model_pipeline_tag": {"const": "text-generation"},
            "max_input_length": _t("integer", "TGI's older name of max_input_tokens"),
            "max_best_of": _t("integer", "the most sequences of best_of (--max-best-of)"),
            "max_stop_sequences": _t("integer", "stop strings per request (--max-stop-sequences)"),
            "max_batch_size": _t("integer", "sequences running at once"),
            "router": {"const": "mixserve"},
            "sha": {"type": "null", "description": "TGI field; unknown"},
            "docker_label": {"type": "null", "description": "TGI field; unknown"},
        },
        description="model, limits, live counters, and TGI's /info fields",
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


def _json(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _sse(schema: Schema) -> dict[str, Any]:
    return {"description": STREAMED, "content": {"text/event-stream": {"schema": schema}}}


def _errors(schema: str = "Error") -> dict[str, Any]:
    codes = {
        "400": "malformed JSON or a field of the wrong type",
        "401": "missing or invalid API key",
        "408": "body not sent within --read-timeout",
        "413": "body too large",
        "422": "a value out of range, or unsupported",
        "429": "too many requests in flight",
        "503": "shards unavailable",
        "504": "past --request-timeout (a stream that has started ends with an error event instead)",
    }
    return {code: _json(_ref(schema), why) for code, why in codes.items()}


MODEL_NOT_FOUND = {"404": _json(_ref("OpenAIError"), "`model` names a model this server does not serve")}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _op(tag: str, summary: str, responses: dict[str, Any], body: str | None = None, **extra: Any) -> dict[str, Any]:
    operation = {"tags": [tag], "summary": summary, "responses": responses, **extra}
    if body is not None:
        operation["requestBody"] = _body(body)
    return operation


def _both(json_schema: str | Schema, sse_schema: str) -> dict[str, Any]:
    schema = _ref(json_schema) if isinstance(json_schema, str) else json_schema
    ok = _json(schema, "JSON when stream is false; " + STREAMED + " when true")
    ok["content"]["text/event-stream"] = {"schema": _ref(sse_schema)}
    return ok


def _predict_ok() -> dict[str, Any]:
    ok = _json(_ref("PredictResponse"), "the text as chunked text/plain deltas; JSON when stream is false")
    ok["content"]["text/plain"] = {"schema": {"type": "string"}}
    return ok


OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/predict"): _op(
        "mixserve",
        "Generate from a prompt or a chat",
        {"200": _predict_ok()} | _errors(),
        "PredictRequest",
    ),
    ("GET", "/health"): _op(
        "operations",
        "200 when every shard answers, or (several shard groups) while one group serves",
        {
            "200": _json(
                _obj(
                    {
                        "status": {"enum": ["ok", "degraded"]},
                        "groups_down": _array(
                            _obj({"group": _t("integer", "group index"), "error": _t("string", "why it is down")}),
                            "only when degraded",
                        ),
                    }
                )
            ),
            "503": _json(_ref("Error"), "shards unavailable"),
        },
    ),
    ("GET", "/info"): _op("operations", "Model, limits and live counters", {"200": _json(_ref("Info"))}),
    ("GET", "/metrics"): _op(
        "operations",
        "Prometheus metrics",
        {
            "200": {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    ),
    ("POST", "/v1/chat/completions"): _op(
        "openai",
        "Chat completion",
        {"200": _both("ChatCompletion", "ChatCompletionChunk")} | _errors("OpenAIError") | MODEL_NOT_FOUND,
        "ChatCompletionRequest",
    ),
    ("POST", "/v1/responses"): _op(
        "openai",
        "Responses API: text or function calls",
        {"200": _both("Response", "ResponseStreamEvent")} | _errors("OpenAIError") | MODEL_NOT_FOUND,
        "ResponsesRequest",
    ),
    ("POST", "/v1/completions"): _op(
        "openai",
        "Text completion",
        {"200": _both("Completion", "Completion")} | _errors("OpenAIError") | MODEL_NOT_FOUND,
        "CompletionRequest",
    ),
    ("GET", "/v1/models"): _op("openai", "The served model", {"200": _json(_ref("ModelList"))}),
    ("GET", "/v1/models/{model}"): _op(
        "openai",
        "One model",
        {"200": _json(_ref("Model")), "404": _json(_ref("OpenAIError"), "not the served model")},
        parameters=[{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
    ),
    ("POST", "/generate"): _op(
        "tgi", "Generate (TGI)", {"200": _json(_ref("GenerateResponse"))} | _errors(), "GenerateRequest"
    ),
    ("POST", "/generate_stream"): _op(
        "tgi", "Generate, streaming tokens (TGI)", {"200": _sse(_ref("StreamResponse"))} | _errors(), "GenerateRequest"
    ),
    ("POST", "/"): _op(
        "tgi",
        "TGI's compat route: /generate (inside a JSON array) or /generate_stream, by `stream`",
        {"200": _both(_array(_ref("GenerateResponse"), "one answer"), "StreamResponse")} | _errors(),
        "CompatGenerateRequest",
    ),
    ("POST", "/tokenize"): _op(
        "tgi", "Tokenize (TGI)", {"200": _json(_array(_ref("SimpleToken")))} | _errors(), "TokenizeRequest"
    ),
    ("GET", "/openapi.json"): _op("operations", "This spec", {"200": _json({"type": "object"})}),
    ("GET", "/docs"): _op(
        "operations", "This spec as HTML", {"200": {"description": "HTML", "content": {"text/html": {}}}}
    ),
}


def routes(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, route template) the app serves, HEAD left out (it mirrors GET)."""
    found = []
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None:
            found.append((route.method, route.resource.canonical))
    return found


def _with_limits(limits: RequestLimits) -> dict[str, Schema]:
    """SCHEMAS with the bounds this server's flags set: stop strings, alternatives per token, choices."""
    schemas = copy.deepcopy(SCHEMAS)
    predict, chat, completion, tgi_parameters = (
        schemas[name]["properties"]
        for name in ("PredictRequest", "ChatCompletionRequest", "CompletionRequest", "GenerateParameters")
    )
    stops = [predict["stop"]["oneOf"][1], chat["stop"]["oneOf"][1], completion["stop"]["oneOf"][1]]
    for stop in [*stops, tgi_parameters["stop"]]:
        stop["maxItems"] = limits.max_stop_sequences
    if limits.max_stop_sequences == 0:
        # Even one stop string is refused, so the single-string spelling is too.
        for body in (predict, chat, completion):
            body["stop"] = {"type": "null", "description": "stop sequences are off (--max-stop-sequences 0)"}
    tgi_parameters["top_n_tokens"]["maximum"] = limits.max_top_n_tokens
    tgi_parameters["best_of"]["maximum"] = limits.max_best_of
    chat["top_logprobs"]["maximum"] = min(oai.MAX_CHAT_TOP_LOGPROBS, limits.max_top_n_tokens)
    completion["logprobs"]["maximum"] = min(oai.MAX_COMPLETION_LOGPROBS, limits.max_top_n_tokens)
    for body in (chat, completion):
        body["n"]["maximum"] = min(oai.MAX_CHOICES, limits.max_choices)
    return schemas


def build_spec(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes."""
    config = app[CONFIG]
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes(app):
        operation = OPERATIONS.get((method, path))
        if operation is not None:
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mixserve",
            "version": config.version or "0",
            "description": f"Serving {config.model_id}. Every route but /health needs the API key when one is set.",
        },
        "paths": paths,
        "components": {
            "schemas": _with_limits(config.limits),
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}, {}],
    }


_BOUNDS = ("default", "minimum", "exclusiveMinimum", "maximum", "minLength", "minItems", "maxItems", "enum")


def _schema_rows(schema: Schema, schemas: dict[str, Schema]) -> str:
    if "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    rows = []
    for name, field in schema.get("properties", {}).items():
        either = "oneOf" in field or "anyOf" in field
        kind = field.get("type") or ("one of" if either else field.get("$ref", "").rsplit("/", 1)[-1])
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        bounds = ", ".join(f"{key} {json.dumps(field[key])}" for key in _BOUNDS if key in field)
        cells = (name, str(kind), bounds, field.get("description", ""))
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    return "<table><tr><th>field</th><th>type</th><th>bounds</th><th>meaning</th></tr>" + "".join(rows) + "</table>"


def render_docs(spec: dict[str, Any]) -> str:
    """The spec as one HTML page that loads nothing else: every route, its body fields and responses."""
    parts = [f"<h1>{html.escape(spec['info']['title'])} {html.escape(spec['info']['version'])}</h1>"]
    description = html.escape(spec["info"]["description"])
    parts.append(f"<p>{description} Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>")
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            parts.append(
                f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p>{html.escape(op['summary'])}</p>"
            )
            if "requestBody" in op:
                body = op["requestBody"]["content"]["application/json"]["schema"]
                parts.append(_schema_rows(body, spec["components"]["schemas"]))
            answers = ", ".join(f"{code}: {r['description']}" for code, r in op["responses"].items())
            parts.append(f"<p>Responses: {html.escape(answers)}</p>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;padding:2px 6px}"
    head = f"<meta charset='utf-8'><title>mixserve API</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"


async def openapi_json(request: web.Request) -> web.Response:
    """`GET /openapi.json`."""
    return web.json_response(build_spec(request.app))


async def docs(request: web.Request) -> web.Response:
    """`GET /docs`."""
    return web.Response(text=render_docs(build_spec(request.app)), content_type="text/html")


def add_routes(app: web.Application) -> None:
    """Register `/openapi.json` and `/docs` on `app`."""
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
