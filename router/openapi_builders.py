"""The small builders the OpenAPI schemas are written with, and the pieces several fronts share: the
error body, stop sequences, the seed, penalty bounds and the grammar.
"""

from typing import Any

from mixserve.router.fields import MAX_SEED
from mixserve.router.params import MAX_ABS_PENALTY, MAX_PRIORITY, MAX_STOP_SEQUENCES

Schema = dict[str, Any]


def typed(kind: str, description: str, **extra: Any) -> Schema:
    """A field of JSON type `kind`, with its description and any other keywords (bounds, default)."""
    return {"type": kind, "description": description, **extra}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), description: str = "") -> Schema:
    """An object with these properties, of which `required` must be present."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def ref(name: str) -> Schema:
    """A reference to the component schema `name`."""
    return {"$ref": f"#/components/schemas/{name}"}


def array(items: Schema, description: str = "", **extra: Any) -> Schema:
    """An array of `items`, with any other keywords (minItems, maxItems)."""
    return {"type": "array", "items": items, **({"description": description} if description else {}), **extra}


def nullable(schema: Schema) -> Schema:
    """`schema` (which has one type) or null."""
    return {**schema, "type": [schema["type"], "null"]}


ERROR = obj({"error": typed("string", "what went wrong"), "error_type": typed("string", "error kind")})
STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        array({"type": "string", "minLength": 1}, maxItems=MAX_STOP_SEQUENCES),
    ],
    "description": "stop sequences: generation ends before the first one produced (not included in the text)",
}
PRIORITY = typed(
    "integer",
    "scheduling priority, lower first (vLLM's); anything but 0 needs --scheduling-policy priority",
    minimum=-MAX_PRIORITY,
    maximum=MAX_PRIORITY,
    default=0,
)
SEED = typed("integer", "seed of the random draws (a seeded request is reproducible)", minimum=0, maximum=MAX_SEED)
PENALTY = {"minimum": -MAX_ABS_PENALTY, "maximum": MAX_ABS_PENALTY, "default": 0.0}
STREAMED = "a stream of server-sent events, each `data: <JSON>` with the schema shown"
GRAMMAR = obj(
    {
        "type": typed("string", "json (value: a JSON schema) or regex (value: the pattern)", enum=["json", "regex"]),
        "value": {"description": "a JSON schema (an object, or JSON text) or a regex the whole output matches"},
    },
    required=("type",),
    description="constrain the output; one that does not compile is a 422",
)
