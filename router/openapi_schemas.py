"""The OpenAPI schemas of the request and response bodies the router serves, by name (`SCHEMAS`; /info's
is in openapi_info.py), gathered from each front's module; the builders they are written with are in
openapi_builders.py. Bounds and defaults come from the modules that enforce them; router/openapi.py
describes the operations that use these schemas.
"""

from mixserve.router.openapi_builders import ERROR, Schema, array, obj, ref, typed
from mixserve.router.openapi_openai import OPENAI_ERROR, OPENAI_SCHEMAS
from mixserve.router.openapi_predict import PREDICT_SCHEMAS
from mixserve.router.openapi_responses import RESPONSES_SCHEMAS
from mixserve.router.openapi_tgi import TGI_SCHEMAS
from mixserve.router.openapi_tokenize import TOKENIZE_SCHEMAS

# SageMaker's /invocations (router/api_sagemaker.py): any of three bodies, told apart by one key.
INVOCATIONS_REQUEST = obj(
    {
        "messages": array({"type": "object"}, "a ChatCompletionRequest: served as /v1/chat/completions"),
        "prompt": {"description": "a CompletionRequest: served as /v1/completions"},
        "inputs": typed("string", "a CompatGenerateRequest: served as TGI's POST /"),
    },
    description="a chat completions, completions or TGI body; the first of messages, prompt and inputs it has "
    "names the route, whose fields it takes",
)

SCHEMAS: dict[str, Schema] = {
    "Error": ERROR,
    "OpenAIError": OPENAI_ERROR,
    "InvocationsRequest": INVOCATIONS_REQUEST,
    # Its errors are those of the route served: OpenAI's object for messages and prompt, TGI's for inputs.
    "InvocationsError": {"anyOf": [ref("OpenAIError"), ref("Error")]},
    **PREDICT_SCHEMAS,
    **OPENAI_SCHEMAS,
    **RESPONSES_SCHEMAS,
    **TGI_SCHEMAS,
    **TOKENIZE_SCHEMAS,
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
