"""Structured output on the router: each API's spelling of a constraint becomes one `GrammarSpec`,
compiled and validated once by llguidance (no torch) into the serialized grammar the shards build
their per-sequence matchers from (shards/grammar.py).

Spellings: OpenAI `response_format` (`text`, `json_object`, `json_schema`); TGI `parameters.grammar`
(`{"type": "json" | "regex", "value": ...}`, also on `/predict`); vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs` (`json`, `regex`,
`choice`, `grammar`); the public gRPC `Grammar` message. A body gives at most one of them.

Compiling runs in a worker thread, never on the event loop, and its result is cached by the
spec's kind and canonical text, so a schema seen before costs a dictionary lookup. A schema, regex
or grammar that does not compile is a ValidationError (422) naming the field and llguidance's
reason; nothing that does not compile is queued.
"""

import asyncio
import functools
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import llguidance

from mixserve.router.errors import BadRequest, ValidationError, json_type_name
from mixserve.router.fields import json_value

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


log = logging.getLogger("mixserve.router")

# Compact JSON, as OpenAI's structured outputs print it: a model (the random demo one above all) could
# otherwise spend its whole budget on whitespace between tokens. A schema's "x-guidance" overrides it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept; one is a few kilobytes of text.
CACHE_SIZE = 512
KINDS = ("json_schema", "regex", "choice", "lark")


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What the output must follow: `kind` (one of KINDS) and its canonical `source` text, the request
    field it came from (for errors), and once compiled, llguidance's serialized `grammar`."""

    kind: str
    source: str
    field: str
    grammar: str = ""


class ConstrainedParams(Protocol):
    """What compiling needs of a request's parameters (router.params.GenerationParams): its grammar."""

    grammar: GrammarSpec | None


def json_schema_spec(field: str, schema: object) -> GrammarSpec:
    """A JSON schema (an object, or true for any JSON value) given as JSON or as JSON text."""
    if isinstance(schema, str):
        schema = json_value(schema, field, ValidationError)
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise BadRequest(f"{field} must be a JSON schema object, got {json_type_name(schema)}")
    # Key order is kept: properties are generated in the order the schema lists them.
    return GrammarSpec("json_schema", json.dumps(schema, ensure_ascii=False), field)


def regex_spec(field: str, pattern: object) -> GrammarSpec:
    """A regular expression the whole output matches (Rust `regex` syntax, as TGI and vLLM take)."""
    if not isinstance(pattern, str):
        raise BadRequest(f"{field} must be a string, got {json_type_name(pattern)}")
    if not pattern:
        raise ValidationError(f"{field} must not be empty")
    return GrammarSpec("regex", pattern, field)


def choice_spec(field: str, choices: object) -> GrammarSpec:
    """The output is exactly one of a non-empty list of strings."""
    if not isinstance(choices, list) or not choices:
        raise BadRequest(f"{field} must be a non-empty array of strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise BadRequest(f"{field}[{i}] must be a non-empty string")
    return GrammarSpec("choice", json.dumps(choices, ensure_ascii=False), field)


def lark_spec(field: str, grammar: object) -> GrammarSpec:
    """A grammar in llguidance's Lark syntax (a GBNF grammar is converted to it)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise BadRequest(f"{field} must be a non-empty string")
    return GrammarSpec("lark", grammar, field)


def from_response_format(value: object, field: str = "response_format") -> GrammarSpec | None:
    """OpenAI's `response_format`: `text` (None), `json_object`, or `json_schema` with `json_schema.schema`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object, got {json_type_name(value)}")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_schema_spec(field, {"type": "object"})
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise BadRequest(f"{field}.json_schema must be an object with the schema under 'schema'")
        if "schema" not in inner:
            # OpenAI requires a schema in strict mode; without one any JSON object will do.
            return json_schema_spec(f"{field}.json_schema", {"type": "object"})
        return json_schema_spec(f"{field}.json_schema.schema", inner["schema"])
    raise ValidationError(f"{field}.type must be one of text, json_object, json_schema; got {kind!r}")


def from_tgi_grammar(value: object, field: str = "grammar") -> GrammarSpec | None:
    """TGI's grammar: `{"type": "json", "value": schema}` or `{"type": "regex", "value": pattern}`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object with type and value, got {json_type_name(value)}")
    kind = value.get("type")
    if kind == "json":
        return json_schema_spec(f"{field}.value", value.get("value"))
    if kind == "regex":
        return regex_spec(f"{field}.value", value.get("value"))
    raise ValidationError(f"{field}.type must be 'json' or 'regex', got {kind!r}")


def _vllm_spec(field: str, kind: str, value: object) -> GrammarSpec:
    if kind == "json":
        return json_schema_spec(field, value)
    if kind == "regex":
        return regex_spec(field, value)
    if kind == "choice":
        return choice_spec(field, value)
    return lark_spec(field, value)


def from_vllm(body: dict[str, Any]) -> list[GrammarSpec]:
    """vLLM's spellings: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, and
    `structured_outputs` with one of `json`, `regex`, `choice`, `grammar`."""
    specs = []
    for kind in ("json", "regex", "choice", "grammar"):
        if body.get(f"guided_{kind}") is not None:
            specs.append(_vllm_spec(f"guided_{kind}", kind, body[f"guided_{kind}"]))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise BadRequest(f"structured_outputs must be an object, got {json_type_name(outputs)}")
        for kind in ("json", "regex", "choice", "grammar"):
            if outputs.get(kind) is not None:
                specs.append(_vllm_spec(f"structured_outputs.{kind}", kind, outputs[kind]))
    return specs


def one_spec(specs: list[GrammarSpec | None]) -> GrammarSpec | None:
    """The one constraint a body gives; two are a ValidationError naming both."""
    given = [s for s in specs if s is not None]
    if len(given) > 1:
        raise ValidationError(f"give one output constraint, got {' and '.join(s.field for s in given)}")
    return given[0] if given else None


def openai_spec(body: dict[str, Any]) -> GrammarSpec | None:
    """The constraint of an OpenAI body: `response_format` or one of vLLM's spellings."""
    return one_spec([from_response_format(body.get("response_format")), *from_vllm(body)])


def grammar_text(spec: GrammarSpec) -> str:
    """llguidance's serialized grammar for `spec` (not yet validated)."""
    if spec.kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.loads(spec.source), defaults=JSON_OPTIONS)
        except ValueError as exc:  # a value llguidance cannot take, such as an integer past 64 bits
            raise ValidationError(f"{spec.field} is not a valid JSON schema: {exc}") from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        return llguidance.grammar_from("choice", spec.source)
    try:
        return llguidance.grammar_from("grammar", spec.source)
    except ValueError as exc:
        raise ValidationError(f"{spec.field} is not a valid grammar: {exc}") from None


class GrammarCache:
    """Compiled grammars by (kind, source), least recently used dropped first; safe across threads."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: GrammarSpec) -> str | None:
        """The compiled grammar of `spec`, if cached."""
        with self._lock:
            grammar = self._grammars.get((spec.kind, spec.source))
            if grammar is not None:
                self._grammars.move_to_end((spec.kind, spec.source))
            return grammar

    def put(self, spec: GrammarSpec, grammar: str) -> None:
        with self._lock:
            self._grammars[(spec.kind, spec.source)] = grammar
            while len(self._grammars) > self.size:
                self._grammars.popitem(last=False)


CACHE = GrammarCache()


@functools.cache
def grammar_tokenizer(tokenizer: "PreTrainedTokenizerBase") -> llguidance.LLTokenizer | None:
    """llguidance's view of the router's tokenizer (built once, ~1 s for Mixtral's), which validates what a
    grammar says about tokens (special tokens, token ranges) as the shards' matchers will; None (logged) for
    a tokenizer llguidance cannot read, whose grammars are then validated without it."""
    from llguidance.hf import from_tokenizer

    try:
        return from_tokenizer(tokenizer)
    except (ValueError, RuntimeError) as exc:
        log.warning("event=grammar_tokenizer_unavailable error=%r", str(exc))
        return None


def compile_spec(
    spec: GrammarSpec, tokenizer: "PreTrainedTokenizerBase | None" = None, cache: GrammarCache = CACHE
) -> GrammarSpec:
    """`spec` with its llguidance grammar, validated over `tokenizer` (the router's; cached by spec: a router
    has one); ValidationError naming the field if it does not compile. Blocking: the event loop calls it
    through `compile_grammar`."""
    grammar = cache.get(spec)
    if grammar is None:
        grammar = grammar_text(spec)
        checker = grammar_tokenizer(tokenizer) if tokenizer is not None else None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, checker)
        if is_error:
            # llguidance's message spans lines (the source with a caret under the fault): one line in the answer.
            reason = " ".join(messages[0].split())
            raise ValidationError(f"{spec.field} is not a valid {_WHAT[spec.kind]}: {reason}")
        cache.put(spec, grammar)
    return replace(spec, grammar=grammar)


_WHAT = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice", "lark": "grammar"}


async def compile_grammar(
    params: "ConstrainedParams", tokenizer: "PreTrainedTokenizerBase | None", cache: GrammarCache = CACHE
) -> None:
    """Compile `params.grammar` over `tokenizer` in a worker thread (on the loop when already cached) and keep
    the compiled spec in `params`; ValidationError when it does not compile."""
    spec = params.grammar
    if spec is None or spec.grammar:
        return
    grammar = cache.get(spec)
    if grammar is not None:
        params.grammar = replace(spec, grammar=grammar)
        return
    params.grammar = await asyncio.get_running_loop().run_in_executor(None, compile_spec, spec, tokenizer, cache)
