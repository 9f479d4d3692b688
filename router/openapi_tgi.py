"""The OpenAPI schemas of the TGI front's bodies: generate (and the compat route), its parameters, tokens,
stream events, tokenize.
"""

from mixserve.router import api_tgi as tgi
from mixserve.router.openapi_builders import GRAMMAR, PENALTY, SEED, Schema, array, nullable, obj, ref, typed
from mixserve.router.params import MAX_BEST_OF, MAX_STOP_SEQUENCES, MAX_TOP_K, MAX_TOP_N_TOKENS

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


TGI_SCHEMAS: dict[str, Schema] = {
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
    "SimpleToken": obj(
        {
            "id": typed("integer", "token id"),
            "text": typed("string", "the span of inputs it covers"),
            "start": typed("integer", "first character"),
            "stop": typed("integer", "one past the last character"),
        }
    ),
}
