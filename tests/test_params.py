"""Request validation for POST /predict: types (400), ranges (422), defaults, chat rendering, errors."""

import subprocess
import sys

import pytest

from mixserve.router.api_predict import parse_predict_request
from mixserve.router.errors import (
    BadRequest,
    GenerationError,
    Overloaded,
    PayloadTooLarge,
    RouterError,
    ShardUnavailable,
    Unauthorized,
    ValidationError,
    error_body,
)
from mixserve.router.fields import decode_json_body
from mixserve.router.params import MAX_STOP_SEQUENCES, GenerationParams, GenerationRequest, render_prompt


def test_defaults():
    request = parse_predict_request({"prompt": "Hello"})
    assert request.prompt == "Hello" and request.messages is None
    assert request.params == GenerationParams(
        max_new_tokens=128,
        temperature=1.0,
        top_p=0.95,
        top_k=50,
        repetition_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        stop=[],
        seed=None,
        stream=True,
        ignore_eos=False,
        top_n_tokens=0,
    )


def test_every_field_is_read():
    body = {
        "prompt": "Hi",
        "stream": False,
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 1,
        "top_k": 0,
        "repetition_penalty": 1.2,
        "stop": ["\n", "User:"],
        "seed": 2**64 - 1,
        "frequency_penalty": 1.5,
        "some_future_field": {"ignored": True},
    }
    params = parse_predict_request(body).params
    assert (params.stream, params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (
        False,
        7,
        0.0,
        1.0,
        0,
    )
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert (params.repetition_penalty, params.stop, params.seed) == (1.2, ["\n", "User:"], 2**64 - 1)
    # /predict has no frequency_penalty field: unknown fields are ignored.
    assert params.frequency_penalty == 0.0


def test_null_means_absent():
    body = {"prompt": "Hi", "messages": None, "temperature": None, "stop": None, "seed": None, "stream": None}
    assert parse_predict_request(body).params == GenerationParams()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_tokens": 5}, 5),
        ({"max_new_tokens": 6}, 6),
        ({"max_tokens": 9, "max_new_tokens": 9}, 9),
        ({"max_tokens": None, "max_new_tokens": 3}, 3),
    ],
)
def test_both_spellings_of_the_token_limit(body, expected):
    assert parse_predict_request({"prompt": "x", **body}).params.max_new_tokens == expected


def test_token_limit_spellings_that_disagree_are_a_422():
    with pytest.raises(
        ValidationError, match=r"max_tokens and max_new_tokens disagree \(max_tokens=5, max_new_tokens=6\)"
    ):
        parse_predict_request({"prompt": "x", "max_tokens": 5, "max_new_tokens": 6})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", "12", "max_tokens must be an integer, got string"),
        ("max_new_tokens", 12.0, "max_new_tokens must be an integer, got number"),
        ("max_tokens", True, "max_tokens must be an integer, got boolean"),
        ("temperature", "hot", "temperature must be a number, got string"),
        ("temperature", False, "temperature must be a number, got boolean"),
        ("top_p", [0.9], "top_p must be a number, got array"),
        ("top_k", 5.5, "top_k must be an integer, got number"),
        ("top_k", True, "top_k must be an integer, got boolean"),
        ("repetition_penalty", {}, "repetition_penalty must be a number, got object"),
        ("stream", "yes", "stream must be a boolean, got string"),
        ("stream", 1, "stream must be a boolean, got number"),
        ("stop", 3, "stop must be a string or an array of strings, got number"),
        ("stop", ["ok", 3], r"stop\[1\] must be a string, got number"),
        ("seed", "42", "seed must be an integer, got string"),
        ("seed", 1.0, "seed must be an integer, got number"),
        ("seed", False, "seed must be an integer, got boolean"),
    ],
)
def test_wrong_json_types_are_a_400_naming_the_field(field, value, message):
    with pytest.raises(BadRequest, match=f"^{message}$") as info:
        parse_predict_request({"prompt": "x", field: value})
    assert info.value.status == 400 and info.value.error_type == "bad_request"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("max_new_tokens", -3, "max_new_tokens must be >= 1, got -3"),
        ("temperature", -0.1, "temperature must be >= 0, got -0.1"),
        ("top_p", 0, "top_p must be > 0 and <= 1, got 0"),
        ("top_p", 1.01, "top_p must be > 0 and <= 1, got 1.01"),
        ("top_k", -1, "top_k must be >= 0 and <= 4294967295, got -1"),
        ("top_k", 2**32, "top_k must be >= 0 and <= 4294967295, got 4294967296"),
        ("repetition_penalty", 0, "repetition_penalty must be > 0, got 0"),
        ("seed", -1, "seed must be >= 0 and <= 18446744073709551615, got -1"),
        ("seed", 2**64, "seed must be >= 0 and <= 18446744073709551615, got 18446744073709551616"),
        ("stop", "", r"stop\[0\] must not be empty"),
        ("stop", ["a", ""], r"stop\[1\] must not be empty"),
        ("stop", ["s"] * (MAX_STOP_SEQUENCES + 1), "stop must hold at most 4 strings, got 5"),
        ("temperature", float("inf"), "temperature must be a finite number, got inf"),
    ],
)
def test_out_of_range_values_are_a_422_naming_the_field_and_bound(field, value, message):
    with pytest.raises(ValidationError, match=f"^{message}$") as info:
        parse_predict_request({"prompt": "x", field: value})
    assert info.value.status == 422 and info.value.error_type == "validation"


def test_bounds_themselves_are_accepted():
    body = {"prompt": "x", "max_tokens": 1, "temperature": 0, "top_p": 1, "top_k": 0, "seed": 0}
    body["stop"] = ["s"] * MAX_STOP_SEQUENCES
    params = parse_predict_request(body).params
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (1, 0, 1, 0, 0)


def test_a_single_stop_string_becomes_a_list():
    assert parse_predict_request({"prompt": "x", "stop": "\n\n"}).params.stop == ["\n\n"]


def test_messages_instead_of_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "bob"}]
    request = parse_predict_request({"messages": messages})
    assert request.prompt is None
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({}, ValidationError, "give exactly one of prompt or messages"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, ValidationError, "exactly one"),
        ({"prompt": ""}, ValidationError, "prompt must not be empty"),
        ({"prompt": 5}, BadRequest, "prompt must be a string, got number"),
        ({"messages": "hi"}, BadRequest, "messages must be an array of {role, content} objects, got string"),
        ({"messages": []}, ValidationError, "messages must not be empty"),
        ({"messages": ["hi"]}, BadRequest, r"messages\[0\] must be an object, got string"),
        ({"messages": [{"content": "hi"}]}, BadRequest, r"messages\[0\].role must be a string, got null"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, BadRequest, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "", "content": "x"}]}, ValidationError, r"messages\[0\].role must not be empty"),
    ],
)
def test_prompt_and_messages_errors(body, error, message):
    with pytest.raises(error, match=message):
        parse_predict_request(body)


def test_params_validate_themselves_when_built_directly():
    # The OpenAI and TGI bodies build GenerationParams too; a bad value can never get past it.
    with pytest.raises(ValidationError, match="frequency_penalty must be >= -2.0 and <= 2.0, got 2.5"):
        GenerationParams(frequency_penalty=2.5)
    with pytest.raises(ValidationError, match="top_n_tokens must be >= 0"):
        GenerationParams(top_n_tokens=-1)
    with pytest.raises(BadRequest, match="ignore_eos must be a boolean"):
        GenerationParams(ignore_eos=None)
    with pytest.raises(ValidationError, match="exactly one of prompt or messages"):
        GenerationRequest(prompt=None, messages=None, params=GenerationParams())


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"\xff\xfe", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object, got array"),
        (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": "a \\ud800 b"}', r"lone UTF-16 surrogate \(\\ud800\)"),
        (b'{"messages": [{"role": "user", "content": "\\uDE00"}]}', r"lone UTF-16 surrogate \(\\ude00\)"),
        (b'{"stop": {"\\udbff": 1}}', "lone UTF-16 surrogate"),
        ('{"prompt": "\\ud83d\\ud83d"}', "lone UTF-16 surrogate"),
        ('{"stop": ' + "[" * 100 + "]" * 100 + "}", "request body nests arrays and objects deeper than 100 levels"),
        ('{"a": [' * 51 + "1" + "]}" * 51, "deeper than 100 levels"),
        ('{"stop": ' + "[" * 100000 + "]" * 100000 + "}", "deeper than 100 levels"),  # past the parser's stack
    ],
    ids=[
        "malformed",
        "not-utf8",
        "array",
        "nan",
        "lone-high-surrogate",
        "lone-low-surrogate",
        "surrogate-in-a-key",
        "two-high-surrogates",
        "101-levels",
        "102-levels-mixed",
        "100001-levels",
    ],
)
def test_json_body_errors(raw, message):
    with pytest.raises(BadRequest, match=message):
        decode_json_body(raw)


def test_json_body_round_trip():
    assert parse_predict_request(decode_json_body('{"prompt": "x", "top_k": 3}')).params.top_k == 3
    # A surrogate pair is one character, whether escaped or sent as UTF-8.
    assert decode_json_body(b'{"prompt": "\\ud83d\\ude00 \\u00e9"}') == {"prompt": "\U0001f600 \u00e9"}
    assert decode_json_body('{"prompt": "\U0001f600"}'.encode()) == {"prompt": "\U0001f600"}
    # 100 levels of nesting, the body's object the first, pass; so do many brackets side by side.
    deep = decode_json_body('{"stop": ' + "[" * 99 + "]" * 99 + "}")["stop"]
    for _ in range(98):
        deep = deep[0]
    assert deep == []
    assert decode_json_body('{"prompt": [' + ", ".join(["[1]", "{}"] * 500) + "]}")["prompt"][-1] == {}


def test_errors_carry_status_type_and_body():
    expected = {
        BadRequest: (400, "bad_request"),
        Unauthorized: (401, "authentication"),
        PayloadTooLarge: (413, "payload_too_large"),
        ValidationError: (422, "validation"),
        Overloaded: (429, "overloaded"),
        GenerationError: (500, "generation"),
        ShardUnavailable: (503, "unavailable"),
    }
    for cls, (status, error_type) in expected.items():
        assert issubclass(cls, RouterError)
        assert (cls.status, cls.error_type) == (status, error_type)
    assert error_body(Overloaded("queue is full")) == {"error": "queue is full", "error_type": "overloaded"}


def test_render_prompt_passes_a_raw_prompt_through(demo_tokenizer):
    assert render_prompt(demo_tokenizer, parse_predict_request({"prompt": "[INST] raw"})) == "[INST] raw"


def test_render_prompt_applies_the_chat_template(demo_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    prompt = render_prompt(demo_tokenizer, parse_predict_request({"messages": messages}))
    assert prompt == "<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Bye [/INST]"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "assistant", "content": "Hi"}], "Conversation roles must alternate"),
        ([{"role": "tool", "content": "Hi"}], "Unknown role 'tool'"),
        ([{"role": "system", "content": "Be brief."}], "A system message must be followed by a user message"),
    ],
)
def test_template_rejections_are_a_422_saying_why(demo_tokenizer, messages, reason):
    with pytest.raises(ValidationError, match=f"chat template rejected the messages: {reason}"):
        render_prompt(demo_tokenizer, parse_predict_request({"messages": messages}))


def test_broken_template_is_a_422(demo_tokenizer):
    tokenizer = demo_tokenizer.__class__.from_pretrained(demo_tokenizer.name_or_path)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }"
    with pytest.raises(ValidationError, match="chat template rejected the messages"):
        render_prompt(tokenizer, parse_predict_request({"messages": [{"role": "user", "content": "x"}]}))


def test_no_chat_template_is_a_422(demo_tokenizer):
    tokenizer = demo_tokenizer.__class__.from_pretrained(demo_tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ValidationError, match="no chat template; send a prompt"):
        render_prompt(tokenizer, parse_predict_request({"messages": [{"role": "user", "content": "x"}]}))


@pytest.mark.slow
def test_text_path_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import router.detokenizer, router.errors, router.params, router.stop_sequences\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
