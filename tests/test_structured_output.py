"""Structured output end to end: real `mixserve launch` servers on the random demo model, driven by the
openai SDK, the text-generation client, /predict and the public gRPC API. The model's tokens are noise,
so whatever it writes under a grammar must still parse, validate and full-match."""

import asyncio
import json
import re

import grpc
import jsonschema
import openai
import pydantic
import pytest
import requests
import text_generation
from text_generation.types import Grammar, GrammarType

from child_processes import free_port
from mixserve_pb import generate_pb2 as pb
from mixserve_pb import generate_pb2_grpc

SMALL = ("--max-batch-prefill-tokens", "64", "--max-batch-size", "16", "--max-kv-blocks", "512")
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
# Bounded (string lengths, item counts, closed objects, integer ranges: a JSON number's digits are not bounded
# by its range) so that even noise finishes well within MAX_TOKENS.
MAX_TOKENS = 400
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 6},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 5},
                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["colors", "ok"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "tag": {"enum": ["a", "b"]}},
            "required": ["id", "tag"],
            "additionalProperties": False,
        },
        "maxItems": 2,
    },
    "optional_and_null": {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": -5, "maximum": 100},
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
        },
        "required": ["note"],
        "additionalProperties": False,
    },
}
REGEX = r"(cat|dog)-[0-9]{2,3}(\.[a-z]{1,4})?"


@pytest.fixture(scope="module")
def two_shards(launch, demo_dir):
    """Two shards (greedy takes the tensor-parallel path), multi-step decode on (its default)."""
    server = launch("--model", str(demo_dir), "--num-shard", "2", "--max-decode-steps", "8", *SMALL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_shard(launch, demo_dir):
    grpc_port = free_port()
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--grpc-port", str(grpc_port), *SMALL)
    server.grpc_address = f"127.0.0.1:{grpc_port}"
    yield server
    server.stop()


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def chat_json(client: openai.OpenAI, name: str, *, stream: bool, temperature: float) -> tuple[str, str]:
    """(content, finish_reason) of one chat completion under SCHEMAS[name]."""
    kwargs = dict(
        model="mixtral-demo",
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=temperature,
        seed=7,
        response_format=json_schema_format(name),
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return content, finish


def check_schema(name: str, content: str, finish_reason: str) -> None:
    assert finish_reason == "stop", f"{name}: ran to {finish_reason} with {content!r}"
    jsonschema.validate(json.loads(content), SCHEMAS[name])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_openai_json_schema_on_two_shards(two_shards, name, stream, temperature):
    client = openai_client(two_shards)
    check_schema(name, *chat_json(client, name, stream=stream, temperature=temperature))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_openai_json_schema_on_one_shard(one_shard, temperature):
    client = openai_client(one_shard)
    for name in SCHEMAS:
        check_schema(name, *chat_json(client, name, stream=False, temperature=temperature))


def test_streamed_and_whole_answers_agree(two_shards):
    client = openai_client(two_shards)
    for temperature in (0.0, 0.9):
        whole = chat_json(client, "nested", stream=False, temperature=temperature)
        assert chat_json(client, "nested", stream=True, temperature=temperature) == whole


def test_json_object(two_shards):
    client = openai_client(two_shards)
    for temperature in (0.0, 0.9):
        choice = client.chat.completions.create(
            model="mixtral-demo",
            messages=CHAT,
            max_tokens=60,
            temperature=temperature,
            seed=3,
            response_format={"type": "json_object"},
        ).choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


class Address(pydantic.BaseModel):
    """SCHEMAS["nested"]'s address as a client's model: what the SDK's responses.parse sends as text.format."""

    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=5)
    zip: int = pydantic.Field(ge=0, le=99999)


def test_responses_text_format(two_shards):
    """The Responses API's text.format: the SDK's responses.parse (a JSON schema from a pydantic model) gets
    an object of that model; streamed under the same schema, the text is the whole answer's; json_object is
    an object; other formats and unserved fields are 422s naming them."""
    client = openai_client(two_shards)
    kwargs = dict(model="mixtral-demo", input="An address as JSON.", max_output_tokens=MAX_TOKENS, temperature=0)
    parsed = client.responses.parse(text_format=Address, **kwargs)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Address)
    assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Address"
    form = {"type": "json_schema", "name": "nested", "schema": SCHEMAS["nested"], "strict": True}
    whole = client.responses.create(text={"format": form}, **kwargs)
    jsonschema.validate(json.loads(whole.output_text), SCHEMAS["nested"])
    events = list(client.responses.create(text={"format": form}, stream=True, **kwargs))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].type == "response.completed"
    loose = client.responses.create(text={"format": {"type": "json_object"}}, **{**kwargs, "max_output_tokens": 60})
    assert loose.output_text.startswith("{")
    for extra, named in (
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type 'grammar'"),
        ({"background": True}, "background is not supported"),
        ({"conversation": "conv_1"}, "conversation is not supported"),
    ):
        with pytest.raises(openai.UnprocessableEntityError, match=named):
            client.responses.create(**kwargs, extra_body=extra)


def test_completions_regex_and_vllm_spellings(two_shards):
    client = openai_client(two_shards)
    for temperature in (0.0, 1.0):
        for extra in ({"guided_regex": REGEX}, {"structured_outputs": {"regex": REGEX}}):
            choice = client.completions.create(
                model="mixtral-demo", prompt="A pet:", max_tokens=40, temperature=temperature, seed=5, extra_body=extra
            ).choices[0]
            assert choice.finish_reason == "stop" and re.fullmatch(REGEX, choice.text), choice
        choices = ["alpha", "beta", "gamma delta"]
        extra = {"guided_choice": choices}
        choice = client.completions.create(
            model="mixtral-demo", prompt="Pick:", max_tokens=40, temperature=temperature, extra_body=extra
        ).choices[0]
        assert choice.text in choices
        extra = {"guided_json": SCHEMAS["array_of_enums"]}
        choice = client.chat.completions.create(
            model="mixtral-demo", messages=CHAT, max_tokens=MAX_TOKENS, temperature=temperature, extra_body=extra
        ).choices[0]
        check_schema("array_of_enums", choice.message.content, choice.finish_reason)


def test_tgi_client_json_and_regex(two_shards):
    client = text_generation.Client(two_shards.url, timeout=300)
    for do_sample in (False, True):
        sampling = {"do_sample": do_sample, "seed": 11}
        for name in ("nested", "array_of_objects"):
            grammar = Grammar(type=GrammarType.Json, value=SCHEMAS[name])
            answer = client.generate("Data:", max_new_tokens=MAX_TOKENS, grammar=grammar, **sampling)
            assert answer.details.finish_reason == "eos_token"
            jsonschema.validate(json.loads(answer.generated_text), SCHEMAS[name])
        grammar = Grammar(type=GrammarType.Regex, value=REGEX)
        streamed = list(client.generate_stream("A pet:", max_new_tokens=40, grammar=grammar, **sampling))
        assert re.fullmatch(REGEX, streamed[-1].generated_text)
        assert streamed[-1].generated_text == "".join(r.token.text for r in streamed if not r.token.special)


def test_predict_grammar_and_response_format(two_shards):
    regex = {"prompt": "A pet:", "max_tokens": 40, "grammar": {"type": "regex", "value": REGEX}}
    whole = requests.post(f"{two_shards.url}/predict", json={**regex, "stream": False}, timeout=300).json()
    assert whole["finish_reason"] == "eos_token" and re.fullmatch(REGEX, whole["output"])
    streamed = requests.post(f"{two_shards.url}/predict", json={**regex, "temperature": 0.7, "seed": 1}, timeout=300)
    assert re.fullmatch(REGEX, streamed.text)
    schema = SCHEMAS["optional_and_null"]
    body = {"prompt": "x", "max_tokens": MAX_TOKENS, "stream": False}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    answer = requests.post(f"{two_shards.url}/predict", json=body, timeout=300).json()
    assert answer["finish_reason"] == "eos_token"
    jsonschema.validate(json.loads(answer["output"]), schema)


def test_grpc_grammar(one_shard):
    async def run() -> None:
        async with grpc.aio.insecure_channel(one_shard.grpc_address) as channel:
            stub = generate_pb2_grpc.GenerationServiceStub(channel)
            schema = SCHEMAS["nested"]
            grammar = pb.Grammar(type="json", value=json.dumps(schema))
            params = pb.GenerationParameters(max_new_tokens=MAX_TOKENS, temperature=0.8, seed=2, grammar=grammar)
            answer = await stub.Generate(pb.GenerateRequest(prompt="x", parameters=params))
            assert answer.finish_reason == pb.FINISH_REASON_EOS_TOKEN
            jsonschema.validate(json.loads(answer.text), schema)
            params = pb.GenerationParameters(max_new_tokens=40, grammar=pb.Grammar(type="regex", value=REGEX))
            texts = [m.token.text async for m in stub.GenerateStream(pb.GenerateRequest(prompt="x", parameters=params))]
            assert re.fullmatch(REGEX, "".join(texts))
            bad = pb.GenerationParameters(grammar=pb.Grammar(type="regex", value="a(b"))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Generate(pb.GenerateRequest(prompt="x", parameters=bad))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "parameters.grammar.value is not a valid regex" in error.value.details()
            for value, needle in [
                ("[yes", "parameters.grammar.value is not valid JSON"),
                ("[" * 101 + "]" * 101, "parameters.grammar.value nests arrays and objects deeper than 100 levels"),
                ('["\\ud800"]', "lone UTF-16 surrogate"),
            ]:
                bad = pb.GenerationParameters(grammar=pb.Grammar(type="choice", value=value))
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.Generate(pb.GenerateRequest(prompt="x", parameters=bad))
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert needle in error.value.details()
            params = pb.GenerationParameters(max_new_tokens=8, grammar=pb.Grammar(type="choice", value='["yes", "no"]'))
            answer = await stub.Generate(pb.GenerateRequest(prompt="x", parameters=params))
            assert answer.text in ("yes", "no")

    asyncio.run(run())


def test_mixed_batch_of_constrained_and_free_requests(two_shards):
    """Constrained and free sequences share steps (multi-step decode runs them together): the constrained
    ones validate, the free ones run to their length limit unconstrained."""
    client = openai.AsyncOpenAI(base_url=f"{two_shards.url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def constrained(i: int) -> None:
        name = list(SCHEMAS)[i % len(SCHEMAS)]
        choice = (
            await client.chat.completions.create(
                model="mixtral-demo",
                messages=CHAT,
                max_tokens=MAX_TOKENS,
                temperature=0.0 if i % 2 else 0.9,
                seed=i,
                response_format=json_schema_format(name),
            )
        ).choices[0]
        check_schema(name, choice.message.content, choice.finish_reason)

    async def free(i: int) -> str:
        choice = (
            await client.completions.create(
                model="mixtral-demo",
                prompt="Once",
                max_tokens=48,
                temperature=0.0 if i % 2 else 0.9,
                seed=i,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
        ).choices[0]
        assert choice.finish_reason == "length"
        return choice.text

    async def run() -> list:
        return await asyncio.gather(*(f(i) for i in range(4) for f in (constrained, free)))

    texts = [t for t in asyncio.run(run()) if t is not None]
    # Free greedy text is the same as with no constrained neighbours.
    alone = openai_client(two_shards).completions.create(
        model="mixtral-demo", prompt="Once", max_tokens=48, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert alone.choices[0].text in texts


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format.json_schema.schema is not a valid JSON schema"),
        ({"guided_regex": "a(b"}, "guided_regex is not a valid regex"),
        ({"guided_json": {"type": "string", "pattern": "[z-a]"}}, "guided_json is not a valid JSON schema"),
    ],
)  # fmt: skip
def test_invalid_constraints_are_422_naming_them(two_shards, body, field):
    client = openai_client(two_shards)
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.chat.completions.create(model="mixtral-demo", messages=CHAT, extra_body=body)
    assert field in error.value.body["message"]
    tgi = requests.post(
        f"{two_shards.url}/generate",
        json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(("}}},
        timeout=60,
    )
    assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation"
    assert tgi.json()["error"].startswith("grammar.value is not a valid regex")
