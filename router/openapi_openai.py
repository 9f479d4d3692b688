"""The OpenAPI schemas of the OpenAI front's bodies: chat completions, completions, models, tools,
logprobs and the OpenAI error (the Responses API's in router/openapi_responses.py).
"""

from mixserve.router import openai_requests as oai
from mixserve.router.fields import MAX_ABS_LOGIT_BIAS, MAX_BAD_WORDS, MAX_LOGIT_BIAS_TOKENS, MAX_SEED
from mixserve.router.openapi_builders import PENALTY, PRIORITY, STOP, Schema, array, nullable, obj, ref, typed
from mixserve.router.params import MAX_TOP_K

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
        {
            "include_usage": typed("boolean", "a last chunk with `usage` and no choices", default=False),
            "continuous_usage_stats": typed(
                "boolean", "vLLM extension: with include_usage, every chunk carries the usage so far", default=False
            ),
        },
        description="only with stream: true",
    ),
    "ignore_eos": typed("boolean", "vLLM extension: keep generating past the EOS token", default=False),
    "min_tokens": typed("integer", "vLLM extension: 0, or equal to the token limit (then ignore_eos)", minimum=0),
    "min_p": typed(
        "number",
        "vLLM extension: drawn tokens are at least this share as likely as the best; 0 is off",
        minimum=0,
        maximum=1,
        default=0.0,
    ),
    "prompt_logprobs": typed(
        "integer",
        "vLLM extension: the prompt tokens' logprobs, ranks and this many alternatives each (not streamed)",
        minimum=0,
    ),
    "stop_token_ids": array(
        {"type": "integer", "minimum": 0}, "vLLM extension: tokens that end the request (text kept unless special)"
    ),
    "allowed_token_ids": array(
        {"type": "integer", "minimum": 0},
        "vLLM extension: only these tokens are sampled (each below the vocabulary size)",
        minItems=1,
    ),
    "bad_words": array(
        {"type": "string", "minLength": 1},
        "vLLM extension: words never generated (each as written and after a space)",
        maxItems=MAX_BAD_WORDS,
    ),
    "return_tokens_as_token_ids": typed(
        "boolean", 'vLLM extension: logprobs name each token "token_id:N"', default=False
    ),
    "return_token_ids": typed(
        "boolean",
        "vLLM extension: the prompt's token ids and each choice's beside the text (streamed: the prompt's in a "
        "choice's first chunk, and each chunk the ids of its tokens since the last)",
        default=False,
    ),
    "cache_salt": typed(
        "string", "vLLM extension: share cached prompt blocks only with requests of the same salt", minLength=1
    ),
    "request_id": typed("string", "vLLM extension: the response's id after its prefix", minLength=1, maxLength=256),
    "priority": PRIORITY,
    "include_stop_str_in_output": typed(
        "boolean", "vLLM extension: keep the matched stop string at the end of the text", default=False
    ),
    "skip_special_tokens": typed("boolean", "vLLM extension: false keeps special tokens' text", default=True),
    "truncate_prompt_tokens": typed(
        "integer", "vLLM extension: keep the prompt's last N tokens (-1: --max-input-tokens; 0: all)", minimum=-1
    ),
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
    "prediction": obj(
        {
            "type": typed("string", "the one kind of prediction", enum=["content"]),
            "content": {
                "oneOf": [
                    {"type": "string"},
                    array(
                        obj({"type": typed("string", "", enum=["text"]), "text": {"type": "string"}}, ("type", "text"))
                    ),
                ],
                "description": "the output expected (text parts are joined)",
            },
        },
        required=("type", "content"),
        description="OpenAI's Predicted Outputs: the request speculates from it, with or without --speculate; "
        "the output stays the model's, and usage.completion_tokens_details says what was kept",
    ),
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
USAGE = obj(
    {
        **{
            k: typed("integer", k.replace("_", " "), minimum=0)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
        "completion_tokens_details": obj(
            {
                "accepted_prediction_tokens": typed("integer", "the prediction's proposed tokens kept", minimum=0),
                "rejected_prediction_tokens": typed("integer", "the prediction's proposed tokens not kept", minimum=0),
            },
            description="with a prediction only",
        ),
    }
)
FINISH = typed("string", "`stop` (EOS or a stop sequence) or `length`", enum=["stop", "length"])
# vLLM's return_token_ids: present only when the request asked.
TOKEN_IDS = array({"type": "integer"}, "with return_token_ids: the choice's token ids (streamed: since its last chunk)")
PROMPT_TOKEN_IDS = array({"type": "integer"}, "with return_token_ids: the prompt's token ids (streamed: first chunk)")
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
OPENAI_ERROR = obj(
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
)
OPENAI_SCHEMAS: dict[str, Schema] = {
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
            "add_generation_prompt": typed(
                "boolean", "vLLM extension: open a new assistant turn after the messages", default=True
            ),
            "continue_final_message": typed(
                "boolean", "vLLM extension: leave the last message open for the model to continue", default=False
            ),
            "chat_template_kwargs": {
                "type": "object",
                "description": "vLLM extension: more variables for the chat template (not messages, tools, tokenize)",
            },
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
                        "token_ids": TOKEN_IDS,
                    }
                )
            ),
            "usage": USAGE,
            "prompt_token_ids": PROMPT_TOKEN_IDS,
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
                        "token_ids": TOKEN_IDS,
                    }
                ),
                "one choice per chunk; empty on the usage chunk",
            ),
            "usage": nullable(USAGE),
            "prompt_token_ids": PROMPT_TOKEN_IDS,
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
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    array({"type": "string", "minLength": 1}, minItems=1),
                    array({"type": "integer", "minimum": 0}, minItems=1),
                    array(array({"type": "integer", "minimum": 0}, minItems=1), minItems=1),
                ],
                "description": "one prompt, or several (n choices each): strings, or token ids used as given (no BOS)",
            },
            "max_tokens": typed(
                "integer",
                "token limit per choice; 0 with echo (not streamed): the prompt scored alone",
                minimum=0,
                default=oai.COMPLETIONS_MAX_TOKENS,
            ),
            "logprobs": typed("integer", "alternatives per token", minimum=0, maximum=oai.MAX_COMPLETION_LOGPROBS),
            "best_of": typed("integer", "must equal n when given", minimum=1),
            "add_special_tokens": typed(
                "boolean", "vLLM extension: a string prompt gets the tokenizer's special tokens (BOS)", default=True
            ),
            "echo": typed(
                "boolean",
                "the prompt before each choice's text (streamed: in its first chunk); with logprobs, its tokens "
                "first, with their logprobs and alternatives",
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
                        "token_ids": TOKEN_IDS,
                        "prompt_token_ids": PROMPT_TOKEN_IDS,
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
}
