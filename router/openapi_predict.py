"""The OpenAPI schemas of `/predict`'s request and response bodies."""

from mixserve.router.openapi_builders import GRAMMAR, PRIORITY, SEED, STOP, Schema, array, obj, ref, typed
from mixserve.router.openapi_openai import OPENAI_SAMPLING
from mixserve.router.params import MAX_TOP_K, GenerationParams

PREDICT = GenerationParams()

PREDICT_SCHEMAS: dict[str, Schema] = {
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
            "priority": PRIORITY,
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
}
