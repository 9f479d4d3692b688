"""Structured output on the router: every API's spelling to one GrammarSpec, compile and cache, and
the 4xx for what does not compile (router/structured.py and the parsers that call it)."""

import asyncio
import json

import pytest

from mixserve.router.api_predict import parse_predict_request
from mixserve.router.api_tgi import parse_generate_request
from mixserve.router.errors import BadRequest, ValidationError
from mixserve.router.openai_requests import parse_chat_request, parse_completion_request
from mixserve.router.params import GenerationParams
from mixserve.router.structured import GrammarCache, compile_grammar, compile_spec, openai_spec

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}
CHAT = [{"role": "user", "content": "hi"}]


def chat(**body):
    return parse_chat_request({"messages": CHAT, **body}).params.grammar


@pytest.mark.parametrize(
    ("spec", "kind", "field"),
    [
        (lambda: chat(response_format={"type": "json_object"}), "json_schema", "response_format"),
        (
            lambda: chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}),
            "json_schema",
            "response_format.json_schema.schema",
        ),
        (lambda: chat(guided_json=SCHEMA), "json_schema", "guided_json"),
        (lambda: chat(guided_regex="a+"), "regex", "guided_regex"),
        (lambda: chat(guided_choice=["yes", "no"]), "choice", "guided_choice"),
        (lambda: chat(structured_outputs={"regex": "[0-9]+"}), "regex", "structured_outputs.regex"),
        (
            lambda: parse_completion_request({"prompt": "p", "guided_grammar": 'start: "a"'}).params.grammar,
            "lark",
            "guided_grammar",
        ),
        (
            lambda: (
                parse_generate_request(
                    {"inputs": "p", "parameters": {"grammar": {"type": "json", "value": SCHEMA}}}, stream=False
                ).params.grammar
            ),
            "json_schema",
            "grammar.value",
        ),
        (
            lambda: (
                parse_generate_request(
                    {"inputs": "p", "parameters": {"grammar": {"type": "regex", "value": "a|b"}}}, stream=True
                ).params.grammar
            ),
            "regex",
            "grammar.value",
        ),
        (
            lambda: parse_predict_request({"prompt": "p", "grammar": {"type": "regex", "value": "a"}}).params.grammar,
            "regex",
            "grammar.value",
        ),
        (
            lambda: parse_predict_request({"prompt": "p", "response_format": {"type": "json_object"}}).params.grammar,
            "json_schema",
            "response_format",
        ),
    ],
)
def test_every_spelling_gives_one_spec(spec, kind, field):
    got = spec()
    assert (got.kind, got.field) == (kind, field)


def test_schema_keeps_its_key_order():
    spec = chat(guided_json=SCHEMA)
    assert list(json.loads(spec.source)["properties"]) == ["b", "a"]


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_free_text_has_no_grammar(response_format):
    assert chat(response_format=response_format) is None


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ({"response_format": {"type": "xml"}}, ValidationError, "response_format.type"),
        ({"response_format": "json"}, BadRequest, "response_format must be an object"),
        ({"response_format": {"type": "json_schema", "json_schema": []}}, BadRequest, "json_schema"),
        ({"guided_json": "{not json"}, ValidationError, "guided_json is not valid JSON"),
        ({"guided_json": '{"enum": ["\\udfff"]}'}, ValidationError, "guided_json .* lone UTF-16 surrogate"),
        ({"guided_json": "[" * 101 + "]" * 101}, ValidationError, "guided_json nests .* deeper than 100 levels"),
        ({"guided_json": "[" * 5000 + "]" * 5000}, ValidationError, "guided_json nests .* deeper than 100 levels"),
        ({"guided_json": '{"type": NaN}'}, ValidationError, "guided_json is not valid JSON: NaN"),
        ({"guided_json": 3}, BadRequest, "guided_json must be a JSON schema object"),
        ({"guided_regex": ""}, ValidationError, "guided_regex must not be empty"),
        ({"guided_choice": []}, BadRequest, "guided_choice"),
        ({"guided_choice": ["a", 1]}, BadRequest, r"guided_choice\[1\]"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, ValidationError, "one output constraint"),
        ({"guided_regex": "a", "ignore_eos": True}, ValidationError, "ignore_eos"),
    ],
)
def test_bad_spellings_are_refused_naming_the_field(body, error, match):
    with pytest.raises(error, match=match):
        chat(**body)


def test_tgi_grammar_type_is_checked():
    with pytest.raises(ValidationError, match="grammar.type"):
        parse_generate_request({"inputs": "p", "parameters": {"grammar": {"type": "xml", "value": ""}}}, stream=False)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"guided_json": {"type": "foo"}}, "guided_json is not a valid JSON schema: .*foo"),
        ({"guided_json": {"type": "string", "pattern": "(a"}}, "guided_json is not a valid JSON schema"),
        ({"guided_regex": "a(b"}, "guided_regex is not a valid regex: .*unclosed group"),
        ({"guided_grammar": "start: nope"}, "guided_grammar is not a valid grammar"),
    ],
)
def test_what_does_not_compile_is_a_422_naming_it(body, match):
    with pytest.raises(ValidationError, match=match):
        compile_spec(openai_spec(body), cache=GrammarCache())


def test_compiled_grammars_are_cached_least_recently_used_first_out():
    cache = GrammarCache(size=2)
    params = GenerationParams(grammar=openai_spec({"guided_json": SCHEMA}))

    async def compile_on_loop() -> None:
        await compile_grammar(params, None, cache)

    asyncio.run(compile_on_loop())
    assert params.grammar.grammar and cache.get(params.grammar) == params.grammar.grammar
    again = GenerationParams(grammar=openai_spec({"guided_json": SCHEMA}))
    asyncio.run(compile_grammar(again, None, cache))
    assert again.grammar.grammar == params.grammar.grammar
    for pattern in ("a", "b"):
        compile_spec(openai_spec({"guided_regex": pattern}), cache=cache)
    assert cache.get(params.grammar) is None  # the least recently used went first


def test_an_uncompiled_grammar_is_not_submitted():
    from mixserve.router.generation import Generation

    params = GenerationParams(grammar=openai_spec({"guided_regex": "a"}))
    with pytest.raises(ValueError, match="compile the grammar"):
        Generation(1, [1], params, tokenizer=None, limits=None, on_cancel=None)


@pytest.mark.parametrize(
    ("grammar", "match"), [('start: "a" <|nope|>', "unknown special token"), ('start: "a" <[99999]>', "too large")]
)
def test_what_a_grammar_says_about_tokens_is_checked_against_the_tokenizer(demo_tokenizer, grammar, match):
    spec = openai_spec({"guided_grammar": grammar})
    with pytest.raises(ValidationError, match=f"guided_grammar is not a valid grammar: .*{match}"):
        compile_spec(spec, demo_tokenizer, GrammarCache())
    assert compile_spec(openai_spec({"guided_grammar": 'start: "a" <[5]>'}), demo_tokenizer, GrammarCache()).grammar
