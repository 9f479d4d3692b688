"""JSON schemas the structured-output tests share."""

# A JSON schema whose outputs end within ~40 tokens of the demo's (a short string, a bounded integer, a
# boolean): the grammar-constrained speculation tests decode it to the end.
SMALL_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}
