"""Property tests of the router's text path: arbitrary input in, a valid result or the module's own error out.

Every request parser (router/params.py's /predict body, the OpenAI and TGI bodies, JSON decoding, chat
rendering) takes arbitrary JSON and either returns a request within the server's limits or raises the
router's BadRequest (400) / ValidationError (422), never another exception. The detokenizer and the stop
matcher, chained as the engine chains them, take arbitrary token ids of the demo tokenizer: the deltas
concatenate to the tokenizer's decode, and a stop string is found wherever it falls across token boundaries.
"""

import asyncio
import math
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mixserve.router.api_predict import parse_predict_request
from mixserve.router.api_tgi import parse_generate_request
from mixserve.router.detokenizer import IncrementalDetokenizer
from mixserve.router.errors import BadRequest, RouterError, ValidationError
from mixserve.router.fields import decode_json_body
from mixserve.router.openai_requests import MAX_CHOICES, parse_chat_request, parse_completion_request, prepare_tools
from mixserve.router.params import GenerationParams, RequestLimits, render_prompt
from mixserve.router.stop_sequences import StopSequenceMatcher
from mixserve.router.structured import GrammarCache, compile_spec, grammar_tokenizer

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value (and the non-finite floats a Python caller could still pass).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def mostly(values: st.SearchStrategy) -> st.SearchStrategy:
    """`values` seven times in eight, any JSON value the eighth."""
    return st.integers(0, 7).flatmap(lambda i: JSON if i == 0 else values)


ROLE = st.sampled_from(["system", "user", "assistant", "developer", "", "tool"])
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])}, optional={"text": mostly(st.text())})
MESSAGE = st.fixed_dictionaries(
    {"role": mostly(ROLE)}, optional={"content": mostly(st.text(max_size=12) | st.lists(PART, max_size=3))}
)
# Numbers at the edges of what the shard wire carries (uint32, uint64, float32) and around the APIs' bounds.
INT = st.sampled_from([0, 1, 2, 5, 2**32 - 1, 2**32, 2**64 - 1, 2**64]) | st.integers(0, 20)
FLOAT = st.sampled_from([0.0, 1e-45, 1e-39, 1.2e-38, 3.4e38, 3.5e38, 1e39, -1e39]) | st.floats(0, 2)
STOPS = st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=7)
TEXT = st.text(max_size=10)
MESSAGES = st.lists(MESSAGE, max_size=3)
OPTIONS = st.fixed_dictionaries({}, optional={"include_usage": JSON, "type": st.sampled_from(["text", "json_object"])})
# Output constraints: schemas of JSON-schema keywords holding values of their own type or any JSON, regexes of
# any text, and the spellings that carry them.
KEYWORDS = {"type": st.sampled_from(["object", "string", "integer", "array", "null", "foo"]), "pattern": TEXT}
KEYWORDS |= {"maxLength": INT, "minimum": FLOAT, "enum": st.lists(JSON, max_size=3), "required": st.lists(TEXT)}
SCHEMA = st.recursive(
    st.fixed_dictionaries({}, optional={name: mostly(v) for name, v in KEYWORDS.items()}),
    lambda inner: st.fixed_dictionaries(
        {}, optional={"properties": st.dictionaries(TEXT, inner, max_size=3), "items": inner, "anyOf": st.lists(inner)}
    ),
    max_leaves=6,
)
REGEX = st.text(alphabet="ab()[]{}|*+?.^$\\0123-,", max_size=8)
GRAMMAR = st.fixed_dictionaries(
    {"type": st.sampled_from(["json", "regex", "xml"])}, optional={"value": mostly(SCHEMA | REGEX)}
)
RESPONSE_FORMAT = OPTIONS | st.fixed_dictionaries(
    {"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries({"name": TEXT}, optional={"schema": SCHEMA})}
)
SAMPLING = {"temperature": FLOAT, "top_p": FLOAT, "top_k": INT, "repetition_penalty": FLOAT}
SAMPLING |= {"frequency_penalty": FLOAT, "stop": STOPS, "seed": INT}
# Each API's fields with values of their own type most of the time, so that many bodies get past the type checks
# to the bounds and the rules between fields; fields a server refuses whatever their value come up now and then.
PREDICT_FIELDS = {**SAMPLING, "max_tokens": INT, "max_new_tokens": INT, "stream": st.booleans(), "grammar": GRAMMAR}
OPENAI_FIELDS = {**SAMPLING, "model": TEXT, "n": INT, "presence_penalty": FLOAT, "stream": st.booleans()}
OPENAI_FIELDS |= {"max_tokens": INT, "max_completion_tokens": INT, "best_of": INT, "min_tokens": INT}
OPENAI_FIELDS |= {"stream_options": OPTIONS, "response_format": RESPONSE_FORMAT, "ignore_eos": st.booleans()}
OPENAI_FIELDS |= {"guided_json": SCHEMA, "guided_regex": REGEX, "guided_choice": st.lists(TEXT, max_size=3)}
OPENAI_FIELDS |= {"guided_grammar": st.text(alphabet='start:a"<|>[]0123456789 %', max_size=16)}
OPENAI_FIELDS |= {"logprobs": st.booleans() | INT, "top_logprobs": INT}
OPENAI_FIELDS |= {"logit_bias": st.dictionaries(st.sampled_from(["0", "5", "-1", "x"]) | TEXT, FLOAT, max_size=3)}
OPENAI_FIELDS |= {"echo": st.booleans()}
OPENAI_REFUSED = ["functions", "suffix"]
NAMES = st.sampled_from(["f", "g", "a b", ""])
FUNCTION = st.fixed_dictionaries(
    {"name": mostly(NAMES)}, optional={"description": mostly(TEXT), "parameters": mostly(SCHEMA)}
)
TOOL = st.fixed_dictionaries(
    {"type": mostly(st.sampled_from(["function", "code"]))}, optional={"function": mostly(FUNCTION)}
)
NAMED = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": NAMES})})
ARGUMENTS = st.sampled_from(['{"a": 1}', "{}", "[1]", "nope"]) | st.dictionaries(TEXT, JSON, max_size=2)
CALL = st.fixed_dictionaries(
    {"id": mostly(st.sampled_from(["c1", "c2"])), "type": st.just("function")},
    optional={"function": mostly(st.fixed_dictionaries({"name": mostly(NAMES), "arguments": mostly(ARGUMENTS)}))},
)
TOOL_TURN = st.fixed_dictionaries(
    {"role": st.sampled_from(["assistant", "tool", "user"])},
    optional={
        "content": mostly(TEXT) | st.none(),
        "tool_calls": mostly(st.lists(CALL, max_size=2)),
        "tool_call_id": mostly(st.sampled_from(["c1", "c2", "zz"])),
    },
)
TOOL_FIELDS = {"tools": st.lists(TOOL, max_size=3), "parallel_tool_calls": st.booleans(), "max_tokens": INT}
TOOL_FIELDS |= {"tool_choice": st.sampled_from(["auto", "none", "required", "any"]) | NAMED}
TGI_FIELDS = {**SAMPLING, "do_sample": st.booleans(), "max_new_tokens": INT, "top_n_tokens": INT, "truncate": INT}
TGI_FIELDS |= {name: st.booleans() for name in ("details", "return_full_text", "decoder_input_details")}
TGI_FIELDS |= {"grammar": GRAMMAR, "typical_p": FLOAT, "best_of": INT}
TGI_REFUSED = ["watermark", "adapter_id"]


def bodies(
    fields: dict[str, st.SearchStrategy], refused: list[str] = (), **required: st.SearchStrategy
) -> st.SearchStrategy[dict]:
    """Objects with the `required` fields and some of `fields` (seven times in eight of their own type, else any
    JSON), and now and then a stray key or one of the `refused` fields."""
    optional = {name: mostly(v) for name, v in fields.items()}
    known = st.fixed_dictionaries({name: mostly(v) for name, v in required.items()}, optional=optional)
    stray = st.dictionaries(st.sampled_from([*refused, "x"]) | st.text(max_size=6), JSON, max_size=1)
    return st.builds(lambda a, b: {**b, **a}, known, st.one_of(st.just({}), st.just({}), stray))


LIMITS = st.builds(
    RequestLimits,
    max_stop_sequences=st.integers(0, 6),
    max_top_n_tokens=st.integers(0, 8),
    max_choices=st.integers(1, 200),
)


def reaches_the_shards_intact(params: GenerationParams) -> bool:
    """Whether every sampling number survives the shard wire's 32-bit floats: finite, and nonzero if it was."""
    for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        value = getattr(params, name)
        (wire,) = struct.unpack("f", struct.pack("f", value))
        # Nor a denormal (below 2**-126, the smallest normal float32): 1 / temperature would overflow.
        if not math.isfinite(wire) or (value and abs(wire) < 2.0**-126):
            return False
    return True


GRAMMARS = GrammarCache()


def compiles_for_the_shards(params: GenerationParams, tokenizer) -> bool:
    """Whether the request's grammar, if any, compiles on the router or is refused with a 422; one that compiles
    builds a shard's matcher over the demo tokenizer (so no step carries a grammar the shards cannot take)."""
    import llguidance

    if params.grammar is None:
        return True
    compiled = parsed_or_refused(compile_spec, params.grammar, tokenizer, GRAMMARS)
    matcher_tokenizer = grammar_tokenizer(tokenizer)
    return compiled is None or not llguidance.LLMatcher(matcher_tokenizer, compiled.grammar, log_level=0).is_error()


def parsed_or_refused(parse, *args, **kwargs):
    """The parser's result, or None when it refused with the router's own 400 or 422."""
    try:
        return parse(*args, **kwargs)
    except (BadRequest, ValidationError) as exc:
        assert exc.status in (400, 422) and str(exc)
        return None


@PROPERTY
@given(body=bodies(PREDICT_FIELDS, prompt=TEXT) | bodies(PREDICT_FIELDS, messages=MESSAGES), limits=LIMITS)
# Found by the fuzzer: finite here, inf as the shards' float32, and the shards refused the whole step.
@example(body={"prompt": "x", "temperature": 1e39}, limits=RequestLimits())
def test_predict_parser(body, limits, demo_tokenizer):
    request = parsed_or_refused(parse_predict_request, body, limits)
    if request is not None:
        assert (request.prompt is None) != (request.messages is None)
        assert len(request.params.stop) <= limits.max_stop_sequences
        assert reaches_the_shards_intact(request.params)
        assert compiles_for_the_shards(request.params, demo_tokenizer)


@PROPERTY
@given(
    chat=bodies(OPENAI_FIELDS, OPENAI_REFUSED, messages=MESSAGES),
    completion=bodies(OPENAI_FIELDS, OPENAI_REFUSED, prompt=TEXT | st.lists(TEXT, max_size=3)),
    limits=LIMITS,
    use_chat=st.booleans(),
)
@example(
    chat={"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 3.5e38},
    completion={},
    limits=RequestLimits(),
    use_chat=True,
)
@example(chat={}, completion={"prompt": "x", "top_p": 1e-40}, limits=RequestLimits(), use_chat=False)
def test_openai_parsers(chat, completion, limits, use_chat, demo_tokenizer):
    parse, body = (parse_chat_request, chat) if use_chat else (parse_completion_request, completion)
    request = parsed_or_refused(parse, body, limits)
    if request is not None:
        assert 1 <= request.n * len(request.prompts) <= min(MAX_CHOICES, limits.max_choices)
        assert len(request.params.stop) <= limits.max_stop_sequences
        assert request.params.top_n_tokens <= limits.max_top_n_tokens
        assert reaches_the_shards_intact(request.params)
        assert compiles_for_the_shards(request.params, demo_tokenizer)


@PROPERTY
@given(
    inputs=TEXT | JSON,
    parameters=bodies(TGI_FIELDS, TGI_REFUSED) | JSON,
    extra=st.dictionaries(st.text(max_size=6), JSON, max_size=2),
    limits=LIMITS,
    stream=st.booleans(),
)
@example(inputs="x", parameters={"repetition_penalty": 1e-39}, extra={}, limits=RequestLimits(), stream=False)
@example(
    inputs="x",
    parameters={"grammar": {"type": "regex", "value": "a{99999}"}},
    extra={},
    limits=RequestLimits(),
    stream=False,
)
def test_tgi_parser(inputs, parameters, extra, limits, stream, demo_tokenizer):
    body = {**extra, "inputs": inputs, "parameters": parameters}
    request = parsed_or_refused(parse_generate_request, body, stream=stream, limits=limits)
    if request is not None:
        assert request.inputs and request.params.stream == stream
        assert len(request.params.stop) <= limits.max_stop_sequences
        assert request.params.top_n_tokens <= limits.max_top_n_tokens
        assert reaches_the_shards_intact(request.params)
        assert compiles_for_the_shards(request.params, demo_tokenizer)


@PROPERTY
@given(raw=st.binary(max_size=40) | JSON.map(lambda value: repr(value).encode()) | st.text(max_size=40))
def test_json_body_decoding(raw):
    body = parsed_or_refused(decode_json_body, raw)
    assert body is None or isinstance(body, dict)


@PROPERTY
@given(messages=st.lists(MESSAGE, min_size=1, max_size=4))
def test_chat_rendering(demo_tokenizer, messages):
    request = parsed_or_refused(parse_chat_request, {"messages": messages})
    if request is not None:
        prompt = parsed_or_refused(render_prompt, demo_tokenizer, request.prompts[0])
        assert prompt is None or isinstance(prompt, str)


def engine_text(tokenizer, prompt_ids: list[int], generated_ids: list[int], stops: list[str]) -> tuple[str, bool]:
    """The text a client gets for `generated_ids`, through the detokenizer and the stop matcher in the engine's
    order: one delta per token, and on the last (unless a stop string ended it) whatever both still hold."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    matcher = StopSequenceMatcher(stops)
    text = ""
    for token_id in generated_ids:
        delta, stopped = matcher.feed(detokenizer.add(token_id))
        text += delta
        if stopped:
            return text, True
    return text + matcher.feed(detokenizer.flush())[0] + matcher.flush(), False


def first_stop_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string to complete (the longest of those ending there), and whether one did."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if text[:end].endswith(stop)]
        if ending:
            return text[: end - len(max(ending, key=len))], True
    return text, False


def token_ids(tokenizer) -> st.SearchStrategy[list[int]]:
    # Any id of the vocabulary: learned pieces, <0xXX> byte tokens (valid UTF-8 or not) and specials.
    return st.lists(st.integers(0, len(tokenizer) - 1), max_size=14)


@PROPERTY
@given(data=st.data())
def test_detokenized_stream_is_the_decode_after_the_prompt(demo_tokenizer, data):
    prompt = data.draw(token_ids(demo_tokenizer), label="prompt")
    generated = data.draw(token_ids(demo_tokenizer), label="generated")
    text, stopped = engine_text(demo_tokenizer, prompt, generated, [])
    prompt_text = demo_tokenizer.decode(prompt, skip_special_tokens=True)
    full_text = demo_tokenizer.decode(prompt + generated, skip_special_tokens=True)
    assert not stopped
    # The detokenizer's contract: exact whenever the prompt's text is a prefix of the full text and the
    # bytes are valid UTF-8 (an invalid byte run decodes to U+FFFD all at once, which no stream foresees).
    if full_text.startswith(prompt_text) and "\ufffd" not in full_text:
        assert text == full_text[len(prompt_text) :]


@PROPERTY
@given(data=st.data(), text=st.text(alphabet="ab c\u00e9\u4e2d\U0001f680\n", min_size=1, max_size=30))
def test_stop_string_is_found_across_token_boundaries(demo_tokenizer, data, text):
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    cut = data.draw(st.integers(0, len(ids)), label="prompt tokens")
    prompt, generated = ids[:cut], ids[cut:]
    generated_text, _ = engine_text(demo_tokenizer, prompt, generated, [])
    if not generated_text:
        return
    # A stop string taken from the generated text itself, wherever the token boundaries fall in it, and a few
    # that may or may not occur.
    start = data.draw(st.integers(0, len(generated_text) - 1), label="stop start")
    end = data.draw(st.integers(start + 1, min(len(generated_text), start + 6)), label="stop end")
    others = data.draw(st.lists(st.text(alphabet="ab c\u00e9", min_size=1, max_size=4), max_size=2), label="others")
    stops = [generated_text[start:end], *others]
    assert engine_text(demo_tokenizer, prompt, generated, stops) == first_stop_cut(generated_text, stops)
    assert first_stop_cut(generated_text, stops)[1]


def test_parsers_refuse_only_with_router_errors():
    # The property tests above would also pass if a parser accepted everything; these bodies must be refused.
    refusals = [
        (parse_predict_request, {"prompt": "x", "stop": ["a"] * 5}, ValidationError),
        (parse_chat_request, {"messages": [{"role": "user", "content": "x"}], "n": 17}, ValidationError),
        (parse_completion_request, {"prompt": "x", "logprobs": 6}, ValidationError),
        (lambda body: parse_generate_request(body, stream=False), {"inputs": 3}, BadRequest),
        # Found by the fuzzer: `True == 1` let `"best_of": true` through as best_of 1.
        (
            lambda body: parse_generate_request(body, stream=False),
            {"inputs": "x", "parameters": {"best_of": True}},
            BadRequest,
        ),
    ]
    for parse, body, error in refusals:
        with pytest.raises(error) as info:
            parse(body)
        assert isinstance(info.value, RouterError)


def _prepared(request, tokenizer) -> bool:
    asyncio.run(prepare_tools(request, tokenizer))
    return True


@PROPERTY
@given(body=bodies(TOOL_FIELDS, messages=st.lists(TOOL_TURN | MESSAGE, max_size=4)))
@example(
    body={
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
    }
)
def test_tool_requests(body, demo_tokenizer):
    """Tools, tool choices and tool turns: refused with the router's 400 or 422, or prepared into a prompt the
    template renders (or refuses) and a grammar the shards can build."""
    request = parsed_or_refused(parse_chat_request, body)
    if request is None or parsed_or_refused(_prepared, request, demo_tokenizer) is None:
        return
    assert compiles_for_the_shards(request.params, demo_tokenizer)
    if request.tools is not None and request.tools.forced:
        assert request.params.grammar is not None
    parsed_or_refused(render_prompt, demo_tokenizer, request.prompts[0])
