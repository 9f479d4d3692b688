"""Tool calling and the Responses API: the tool grammar, the parsing of calls and the rendering of tool turns
(router/tools.py), then a real `mixserve launch` server on the random demo model driven by the openai SDK
unchanged. The model's tokens are noise: forced calls must still parse and validate."""

import copy
import json
from pathlib import Path

import jsonschema
import llguidance
import openai
import pytest
import requests

from mixserve.router.errors import RouterError
from mixserve.router.structured import compile_spec, grammar_tokenizer
from mixserve.router.tool_turns import (
    as_template_turns,
    as_text_turns,
    mistral_id,
    parse_tool_turns,
    template_takes_tools,
)
from mixserve.router.tools import (
    CALL_TOKEN,
    Function,
    ToolPlan,
    call_token_id,
    calls_grammar,
    calls_schema,
    parse_calls,
    parse_tools,
)

SMALL = ("--max-batch-prefill-tokens", "64", "--max-batch-size", "16", "--max-kv-blocks", "512")
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"tz": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["tz"],
    "additionalProperties": False,
}
PARAMETERS = {"get_weather": WEATHER, "get_time": CLOCK}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} of a place", "parameters": schema}}
    for name, schema in PARAMETERS.items()
]
FUNCTIONS = tuple(Function(name, "", schema) for name, schema in PARAMETERS.items())
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# A template that takes tools, in the shape of Mixtral-8x22B-Instruct's ([AVAILABLE_TOOLS] ... [TOOL_CALLS]).
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS] {{ {'call_id': m.tool_call_id, 'content': m.content} | tojson }}"
    "[/TOOL_RESULTS]{% elif m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | tojson }}{{ eos_token }}"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)


def test_calls_schema_takes_only_allowed_calls_with_valid_arguments():
    plan = ToolPlan(FUNCTIONS, "required")
    schema = calls_schema(plan)
    jsonschema.validate([{"name": "get_time", "arguments": {"tz": 3}}], schema)
    jsonschema.validate(
        [{"name": "get_time", "arguments": {"tz": 3}}, {"name": "get_time", "arguments": {"tz": 4}}], schema
    )
    for wrong in (
        [],
        [{"name": "get_time", "arguments": {"tz": 30}}],
        [{"name": "get_clock", "arguments": {"tz": 3}}],
        [{"name": "get_weather", "arguments": {"tz": 3}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    single = calls_schema(ToolPlan(FUNCTIONS, "function", "get_weather", parallel=False))
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "x", "unit": "c"}}], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {"tz": 3}}], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": "x", "unit": "c"}}] * 2, single)


def _accepts(tokenizer, grammar: str, text: str) -> bool:
    checker = grammar_tokenizer(tokenizer)
    matcher = llguidance.LLMatcher(checker, grammar, log_level=0)
    # llguidance's own tokenization: the tokenizer's would put a word-start space before the first piece.
    ids = checker.tokenize_str(text)
    return matcher.consume_tokens(ids) and matcher.is_accepting() and not matcher.is_error()


def test_calls_grammar_compiles_and_holds_the_calls(demo_tokenizer):
    plan = ToolPlan(FUNCTIONS, "required")
    spec = compile_spec(calls_grammar(plan, None), demo_tokenizer)
    assert _accepts(demo_tokenizer, spec.grammar, '[{"name": "get_time", "arguments": {"tz": 3}}]')
    assert not _accepts(demo_tokenizer, spec.grammar, '[{"name": "get_time", "arguments": {"tz": 13}}]')


def test_calls_grammar_after_the_call_token(demo_tokenizer):
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    token_id = call_token_id(tokenizer)
    assert token_id is not None and call_token_id(demo_tokenizer) is None
    spec = compile_spec(calls_grammar(ToolPlan(FUNCTIONS, "function", "get_time"), token_id), tokenizer)
    assert _accepts(tokenizer, spec.grammar, '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": -2}}]')
    assert not _accepts(tokenizer, spec.grammar, '[{"name": "get_time", "arguments": {"tz": -2}}]')


def test_auto_grammar_is_free_text_or_the_call_token_and_valid_calls(demo_tokenizer):
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    spec = compile_spec(calls_grammar(ToolPlan(FUNCTIONS, "auto"), call_token_id(tokenizer)), tokenizer)
    for text in ("It is sunny, [see] {here}.", "", '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": 5}}]'):
        assert _accepts(tokenizer, spec.grammar, text), text
    weather = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]'
    assert _accepts(tokenizer, spec.grammar, weather)
    for text in ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": 13}}]', "[TOOL_CALLS] It is sunny."):
        assert not _accepts(tokenizer, spec.grammar, text), text
    with pytest.raises(ValueError, match="needs the call token"):
        calls_grammar(ToolPlan(FUNCTIONS, "auto"), None)


def test_parse_calls():
    [call] = parse_calls('[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": 1}}]', FUNCTIONS)
    assert (call.name, json.loads(call.arguments)) == ("get_time", {"tz": 1}) and call.id.startswith("call_")
    calls = parse_calls(' [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {}}]', FUNCTIONS)
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert parse_calls('{"name": "get_time", "arguments": {"tz": 1}}', FUNCTIONS)[0].name == "get_time"
    for not_calls in (
        "Hello",
        '[{"name": "other", "arguments": {}}]',
        '[{"name": "get_time", "arguments": 3}]',
        "[1",
        "[]",
    ):
        assert parse_calls(not_calls, FUNCTIONS) is None


def test_parse_tools_refuses_bad_definitions():
    plan = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert plan.choice == "function" and plan.named == "get_time" and plan.parallel
    assert parse_tools({"tools": TOOLS}).choice == "auto" and parse_tools({}) is None
    for body, words in (
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [*TOOLS, TOOLS[0]]}, "more than once"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "parameters"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ):
        with pytest.raises(RouterError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_tools(body)


WEATHER_ARGUMENTS = '{"city": "Paris", "unit": "c"}'
CONVERSATION = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGUMENTS}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": 1}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18"},
    {"role": "tool", "tool_call_id": "call_b", "content": "13:00"},
    {"role": "user", "content": "Thanks."},
]  # fmt: skip


def test_tool_turns_refused_when_wrong():
    for messages, words in (
        ([{"role": "tool", "tool_call_id": "x", "content": "1"}], "answers no earlier"),
        ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "[1]"}}]}], "object"),
        ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}], "JSON"),
        ([{"role": "assistant", "tool_calls": "x"}], "tool_calls"),
    ):
        with pytest.raises(RouterError, match=words):
            parse_tool_turns(messages)


def test_tool_turns_for_a_template_without_tools(demo_tokenizer):
    assert not template_takes_tools(demo_tokenizer)
    turns = as_text_turns(parse_tool_turns(CONVERSATION), FUNCTIONS)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert "get_weather" in turns[0]["content"] and '"maxLength": 8' in turns[0]["content"]
    assert json.loads(turns[2]["content"])[1] == {"name": "get_time", "arguments": {"tz": 1}}
    assert "Result of get_time (call call_b): 13:00" in turns[3]["content"] and "Thanks." in turns[3]["content"]
    demo_tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def test_tool_turns_for_a_template_that_takes_tools(demo_tokenizer):
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert template_takes_tools(tokenizer)
    turns = as_template_turns(parse_tool_turns(CONVERSATION))
    tools = [f.as_tool() for f in FUNCTIONS]
    text = tokenizer.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.count("[AVAILABLE_TOOLS]") == 1 and '"arguments": {"tz": 1}' in text
    assert (
        mistral_id("call_b") in text and len(mistral_id("call_b")) == 9 and mistral_id("call_a") != mistral_id("call_b")
    )


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", *SMALL)
    yield server
    server.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def native_checkpoint(demo_dir: Path, out: Path) -> int:
    """The demo with a template that takes tools (TOOLS_TEMPLATE) and its last token made `[TOOL_CALLS]`, a
    special token (the piece it was, and the merge that made it, dropped); returns the token's id."""
    out.mkdir()
    for f in demo_dir.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            (out / f.name).symlink_to(f)
    tokenizer = json.loads((demo_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    token_id = len(vocab) - 1
    piece = next(k for k, v in vocab.items() if v == token_id)
    del vocab[piece]
    vocab[CALL_TOKEN] = token_id
    merges = tokenizer["model"]["merges"]
    tokenizer["model"]["merges"] = [m for m in merges if "".join(m.split(" ") if isinstance(m, str) else m) != piece]
    entry = {"content": CALL_TOKEN, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    tokenizer["added_tokens"].append({"id": token_id, **entry, "special": True})
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(token_id)] = {**entry, "special": True}
    config["chat_template"] = TOOLS_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return token_id


@pytest.fixture(scope="module")
def native(launch, demo_dir, tmp_path_factory):
    """A server of the demo as a checkpoint whose template takes tools and has the call token, and the token's id."""
    model = tmp_path_factory.mktemp("native") / "model"
    token_id = native_checkpoint(demo_dir, model)
    server = launch("--model", str(model), "--num-shard", "1", *SMALL)
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300), token_id
    server.stop()


def check_calls(calls: list[tuple[str, str]], allowed: set[str], parallel: bool) -> None:
    assert calls and (parallel or len(calls) == 1), calls
    for name, arguments in calls:
        assert name in allowed
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def chat_calls(client, *, stream: bool, **kwargs) -> list[tuple[str, str]]:
    """(name, arguments) of the calls of one chat completion, assembled from the deltas when streamed."""
    kwargs = {"model": "mistral-7b", "messages": ASK, "tools": TOOLS, "max_tokens": 300, "seed": 5, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
        return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                    calls[delta.index] = [delta.function.name, ""]
                calls[delta.index][1] += delta.function.arguments or ""
    assert finish == "tool_calls"
    return [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}], ids=["required", "named"]
)
def test_forced_calls_validate_and_stream_the_same(client, choice, parallel):
    allowed = {"get_time"} if isinstance(choice, dict) else set(PARAMETERS)
    for temperature in (0.0, 0.9):
        sampling = {"tool_choice": choice, "parallel_tool_calls": parallel, "temperature": temperature}
        whole = chat_calls(client, stream=False, **sampling)
        check_calls(whole, allowed, parallel)
        streamed = chat_calls(client, stream=True, **sampling)
        assert streamed == whole


def test_with_the_call_token_auto_calls_validate_and_text_stays_free(native):
    """On a template with `[TOOL_CALLS]`, `auto` leaves text free and makes a call the model begins valid: the
    token biased up, the noise model begins one at once (and, unconstrained, wrote the token to the end)."""
    client, token_id = native
    bias = {"tool_choice": "auto", "temperature": 0, "logit_bias": {str(token_id): 100}}
    whole = chat_calls(client, stream=False, **bias)
    check_calls(whole, set(PARAMETERS), True)
    assert chat_calls(client, stream=True, **bias) == whole
    check_calls(chat_calls(client, stream=False, tool_choice="required"), set(PARAMETERS), True)
    free = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert free.choices[0].message.tool_calls is None and free.choices[0].message.content


def test_a_conversation_with_tool_turns_answers(client):
    for stream in (False, True):
        answer = client.chat.completions.create(
            model="m",
            messages=CONVERSATION,
            tools=TOOLS,
            tool_choice="none",
            max_tokens=6,
            temperature=0,
            stream=stream,
        )
        if not stream:
            assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.prompt_tokens > 40
        else:
            assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in answer)
    answer = client.chat.completions.create(model="m", messages=CONVERSATION, tools=TOOLS, max_tokens=6, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tokenize_counts_the_chat_requests_prompt_with_tools(client, native):
    """vLLM's /tokenize with messages, tools and tool turns: the count a chat request with them has, for a
    template that takes tools and for one that gets them as text."""
    for openai_client in (client, native[0]):
        url = str(openai_client.base_url).removesuffix("/").removesuffix("/v1")
        for messages, extra in (
            (CONVERSATION, {"tools": TOOLS}),
            (ASK, {"tools": TOOLS}),
            (ASK, {"tools": TOOLS, "tool_choice": "none"}),  # no tool offered
            (CONVERSATION, {}),
        ):
            body = {"messages": messages, **extra}
            counted = requests.post(f"{url}/tokenize", json=body, timeout=60).json()
            answer = openai_client.chat.completions.create(model="m", max_tokens=1, temperature=0, **body)
            assert counted["count"] == answer.usage.prompt_tokens == len(counted["tokens"]), (url, messages, extra)
    refused = requests.post(f"{url}/tokenize", json={"prompt": "x", "tools": TOOLS}, timeout=60)
    assert refused.status_code == 422 and "tools go with messages" in refused.json()["error"]


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "foo"}}}


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}]}, "parameters is not"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "one output"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "1"}]}, "messages[1].tool_call_id"),
    ],
)  # fmt: skip
def test_bad_tools_and_tool_messages_are_named(client, extra, words):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**{"model": "m", "messages": ASK, "max_tokens": 4, **extra})
    assert 400 <= caught.value.status_code < 500 and words in caught.value.message


def test_responses_text(client):
    kwargs = {"model": "m", "input": "Say hi", "instructions": "Be brief.", "max_output_tokens": 8, "temperature": 0}
    whole = client.responses.create(**kwargs)
    assert whole.status == "incomplete" and whole.output[0].type == "message" and whole.output_text
    assert whole.usage.output_tokens == 8 and whole.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert "response.output_text.done" in kinds and [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}]
    assert client.responses.create(**{**kwargs, "input": items}).output_text == whole.output_text


def test_responses_function_calls(client):
    tools = [
        {"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]} for t in TOOLS
    ]
    kwargs = {"model": "m", "input": "Time?", "tools": tools, "max_output_tokens": 300, "temperature": 0}
    whole = client.responses.create(tool_choice="required", **kwargs)
    assert whole.status == "completed" and all(o.type == "function_call" for o in whole.output)
    check_calls([(o.name, o.arguments) for o in whole.output], set(PARAMETERS), True)
    with client.responses.stream(tool_choice={"type": "function", "name": "get_time"}, **kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_calls([(o.name, o.arguments) for o in final.output], {"get_time"}, True)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [o.arguments for o in final.output]
    call = whole.output[0]
    follow_up = [
        {"role": "user", "content": "Time?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "13:00"},
    ]
    answer = client.responses.create(**{**kwargs, "input": follow_up, "max_output_tokens": 4})
    assert answer.output[0].type in ("message", "function_call")
