"""The TGI API through the `text-generation` client (unchanged) against a real 2-shard launch; SSE errors."""

import json

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError
from transformers import AutoTokenizer

from launched_server import post_text as post
from mixserve.router import api_openai
from mixserve.router.errors import ShardUnavailable, error_body
from mixserve.router.http_common import stream_sse

PROMPT = "The old river runs"
# text-generation 0.7 calls pydantic's deprecated `.dict()`.
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")
# The client's default (10 s) is short for a busy 2-core CI machine.
CLIENT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "2", "--max-kv-blocks", "256", "--max-total-tokens", "96")
    yield server
    server.stop()  # free the CPU for the modules after this one


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


async def predict(url: str, prompt: str, max_tokens: int) -> str:
    """The greedy oracle: /predict's text for the same prompt."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": False, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/predict", json=body) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["output"]


@pytest.mark.slow
async def test_client_generate_greedy_matches_predict(server, tokenizer):
    expected = await predict(server.url, PROMPT, 12)
    answer = Client(server.url, timeout=CLIENT_TIMEOUT_S).generate(PROMPT, max_new_tokens=12)
    assert answer.generated_text == expected
    details = answer.details
    assert details.finish_reason == "length" and details.generated_tokens == 12 and details.seed is None
    assert "".join(t.text for t in details.tokens if not t.special) == expected
    assert all(t.logprob <= 0 for t in details.tokens) and details.prefill == []


@pytest.mark.slow
async def test_client_generate_stream(server):
    expected = await predict(server.url, PROMPT, 10)
    responses = list(Client(server.url, timeout=CLIENT_TIMEOUT_S).generate_stream(PROMPT, max_new_tokens=10))
    assert len(responses) == 10
    assert "".join(r.token.text for r in responses) == expected
    assert all(r.generated_text is None and r.details is None for r in responses[:-1])
    assert responses[-1].generated_text == expected
    assert responses[-1].details.finish_reason == "length" and responses[-1].details.generated_tokens == 10


@pytest.mark.slow
async def test_async_client_and_parameters(server, tokenizer):
    client = AsyncClient(server.url, timeout=CLIENT_TIMEOUT_S)
    expected = await predict(server.url, PROMPT, 6)
    full = await client.generate(
        PROMPT, max_new_tokens=6, return_full_text=True, decoder_input_details=True, top_n_tokens=3
    )
    assert full.generated_text == PROMPT + expected
    ids = tokenizer(PROMPT)["input_ids"]
    prefill = full.details.prefill
    assert [t.id for t in prefill] == ids and prefill[0].logprob is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in prefill[1:])
    for token, top in zip(full.details.tokens, full.details.top_tokens, strict=True):
        assert len(top) == 3 and top[0].id == token.id  # greedy picks the most likely
    sampled = [(await client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=11)) for _ in range(2)]
    assert sampled[0].generated_text == sampled[1].generated_text and sampled[0].details.seed == 11
    streamed = [r async for r in client.generate_stream(PROMPT, max_new_tokens=2, stop_sequences=[expected[:2]])]
    assert streamed[-1].details.finish_reason == "stop_sequence" and streamed[-1].generated_text == ""


@pytest.mark.slow
async def test_raw_routes_and_sse_framing(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    status, _, text = await post(server.url, "/generate", body)
    assert status == 200 and set(json.loads(text)) == {"generated_text"}  # details only when asked
    status, _, text = await post(server.url, "/", body)
    assert status == 200 and isinstance(json.loads(text), list)
    status, content_type, text = await post(server.url, "/", {**body, "stream": True})
    assert status == 200 and content_type.startswith("text/event-stream")
    events = text.split("\n\n")
    assert events[-1] == "" and len(events) == 4 and "[DONE]" not in text
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [p["index"] for p in payloads] == [1, 2, 3] and payloads[-1]["generated_text"]
    assert set(payloads[0]["token"]) == {"id", "text", "logprob", "special"}


@pytest.mark.slow
async def test_tokenize_info_and_spec(server, tokenizer):
    status, _, text = await post(server.url, "/tokenize", {"inputs": PROMPT})
    tokens = json.loads(text)
    assert status == 200 and [t["id"] for t in tokens] == tokenizer(PROMPT)["input_ids"]
    assert "".join(t["text"] for t in tokens) == PROMPT and tokens[-1]["stop"] == len(PROMPT)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/info") as response:
            info = await response.json()
        async with session.get(f"{server.url}/openapi.json") as response:
            spec = await response.json()
    assert info["max_best_of"] == 2 and info["max_input_length"] == info["max_input_tokens"] == 95
    assert info["kv_blocks_total"] == 256 and info["model_pipeline_tag"] == "text-generation"
    assert info["max_batch_prefill_tokens"] == 256, "CPU shards: the CPU default chunk"
    assert {"/generate", "/generate_stream", "/", "/tokenize", "/v1/completions", "/metrics"} <= set(spec["paths"])
    assert set(info) == set(spec["components"]["schemas"]["Info"]["properties"]), "/info and its schema differ"


@pytest.mark.slow
async def test_tokenize_and_detokenize_in_vllms_dialect(server, tokenizer):
    status, _, text = await post(server.url, "/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    answer, ids = json.loads(text), tokenizer(PROMPT)["input_ids"]
    assert status == 200 and answer["tokens"] == ids and answer["count"] == len(ids)
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(ids) and answer["max_model_len"] == 96
    status, _, text = await post(server.url, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert json.loads(text)["tokens"] == ids[1:] and json.loads(text)["token_strs"] is None
    chat = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "It runs"}]
    for options, template in (
        ({}, {"add_generation_prompt": True}),
        ({"continue_final_message": True}, {"continue_final_message": True}),
    ):
        status, _, text = await post(server.url, "/tokenize", {"messages": chat, **options})
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, **template)
        expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert status == 200 and json.loads(text)["tokens"] == expected
    status, _, text = await post(server.url, "/detokenize", {"tokens": ids})
    assert status == 200 and json.loads(text) == {"prompt": tokenizer.decode(ids)}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/tokenizer_info") as response:
            info = await response.json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template and info["vocab_size"] == len(tokenizer)
    for path, body, want in (
        ("/detokenize", {"tokens": [1, 10**6]}, 422),
        ("/detokenize", {"tokens": "abc"}, 400),
        ("/tokenize", {"prompt": "x", "messages": chat}, 400),
        ("/tokenize", {"messages": chat, "tools": [{"type": "function"}]}, 400),
        # Found by the fuzzer: a field of the other dialect, or of the unused form, is still checked.
        ("/tokenize", {"inputs": PROMPT, "chat_template_kwargs": [1]}, 422),
        ("/tokenize", {"prompt": PROMPT, "chat_template_kwargs": [1]}, 400),
        ("/tokenize", {"prompt": PROMPT, "add_generation_prompt": "yes"}, 400),
    ):
        status, _, text = await post(server.url, path, body)
        assert status == want and json.loads(text)["error"], (path, body, text)


@pytest.mark.slow
async def test_chat_tokenize_is_the_chat_requests_prompt(server, tokenizer):
    """TGI's /chat_tokenize: the templated text and its tokens with their spans, the prompt the same body gets
    as a chat request (tools included: the demo's template gets them as text)."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    for extra in ({}, {"tools": tools}):
        body = {"messages": chat, "max_tokens": 1, **extra}
        status, _, text = await post(server.url, "/chat_tokenize", body)
        answer = json.loads(text)
        assert status == 200 and set(answer) == {"tokenize_response", "templated_text"}
        templated, tokens = answer["templated_text"], answer["tokenize_response"]
        assert PROMPT in templated and ("weather" in templated) == bool(extra)
        assert [t["id"] for t in tokens] == tokenizer(templated, add_special_tokens=False)["input_ids"]
        assert all(t["text"] == templated[t["start"] : t["stop"]] for t in tokens)
        # With the tools the prompt is past this server's 95 input tokens: vLLM's /tokenize counts it as chat does.
        path, count = ("/tokenize", lambda a: a["count"]) if extra else ("/v1/chat/completions", _prompt_tokens)
        status, _, text = await post(server.url, path, body)
        assert status == 200 and count(json.loads(text)) == len(tokens), text
    status, _, text = await post(server.url, "/chat_tokenize", {"messages": []})
    assert status == 422 and json.loads(text)["error_type"] == "validation"  # TGI's error shape


@pytest.mark.slow
async def test_sagemaker_ping_and_invocations(server):
    """SageMaker's routes: /ping answers as /health; /invocations serves a body by its key, as the route it names."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/ping") as ping, session.get(f"{server.url}/health") as health:
            assert ping.status == health.status == 200 and await ping.json() == await health.json()
    greedy = {"max_tokens": 4, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": PROMPT}], **greedy}
    served = {}
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"prompt": PROMPT, **greedy}),
        ("/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}),
    ):
        status, _, text = await post(server.url, "/invocations", body)
        direct = await post(server.url, path, body)
        assert status == direct[0] == 200
        served[path] = json.loads(text)
        assert _without_ids(served[path]) == _without_ids(json.loads(direct[2])), path
    assert served["/v1/chat/completions"]["object"] == "chat.completion"
    assert served["/v1/completions"]["object"] == "text_completion"
    assert set(served["/"][0]) == {"generated_text"}
    streamed = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": True}
    status, content_type, text = await post(server.url, "/invocations", streamed)
    assert status == 200 and content_type.startswith("text/event-stream") and '"generated_text"' in text
    status, _, text = await post(server.url, "/invocations", {"input": PROMPT})
    assert status == 400 and "messages (chat), prompt (completions) or inputs (TGI)" in json.loads(text)["error"]


def _prompt_tokens(answer):
    return answer["usage"]["prompt_tokens"]


def _without_ids(answer):
    """An answer without what differs between two requests of the same text: ids and creation times."""
    if isinstance(answer, list):
        return answer
    return {key: value for key, value in answer.items() if key not in ("id", "created")}


@pytest.mark.parametrize(
    "parameters, status, needle",
    [
        ({"typical_p": 1.0}, 422, "typical_p"),
        ({"best_of": 2}, 422, "best_of"),
        ({"best_of": 2, "do_sample": True}, 422, "streaming"),
        ({"temperature": 0}, 422, "temperature"),
        ({"top_n_tokens": 6}, 422, "top_n_tokens"),
        ({"max_new_tokens": "ten"}, 400, "max_new_tokens"),
        ({"max_new_tokens": 200}, 422, "max_total_tokens"),
        ({"decoder_input_details": True}, 422, "streaming"),
    ],
)
@pytest.mark.slow
async def test_errors(server, parameters, status, needle):
    got, _, text = await post(server.url, "/generate_stream", {"inputs": PROMPT, "parameters": parameters})
    assert got == status
    payload = json.loads(text)
    assert needle in payload["error"] and payload["error_type"] == ("validation" if status == 422 else "bad_request")


@pytest.mark.slow
async def test_truncate_keeps_the_last_prompt_tokens(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "truncate": 3, "details": True}}
    status, _, text = await post(server.url, "/generate_stream", body)
    last = json.loads(text.split("\n\n")[-2].removeprefix("data: "))
    assert status == 200 and last["details"]["input_length"] == 3


@pytest.mark.slow
async def test_client_raises_tgi_errors(server):
    with pytest.raises(ValidationError, match="max_total_tokens"):
        Client(server.url, timeout=CLIENT_TIMEOUT_S).generate(PROMPT, max_new_tokens=500)
    with pytest.raises(ValidationError, match="stop"):
        stops = ["a", "b", "c", "d", "e"]
        [
            r
            async for r in AsyncClient(server.url, timeout=CLIENT_TIMEOUT_S).generate_stream(
                PROMPT, stop_sequences=stops
            )
        ]


async def failing_payloads(first: dict):
    yield first
    raise ShardUnavailable("the shards failed: shard 1 exited")


async def test_errors_after_the_first_event_end_the_stream():
    """A failure after headers went out is a last SSE event, in each API's shape (`stream_sse`)."""

    async def tgi(request):
        return await stream_sse(request, failing_payloads({"token": {"id": 1}}), error_body)

    async def chat(request):
        return await stream_sse(request, failing_payloads({"object": "chat.completion.chunk"}), api_openai.error_body)

    app = web.Application()
    app.router.add_post("/tgi", tgi)
    app.router.add_post("/v1/chat/completions", chat)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/tgi")
        assert response.status == 200
        events = (await response.text()).split("\n\n")
        assert json.loads(events[1].removeprefix("data: ")) == {
            "error": "the shards failed: shard 1 exited",
            "error_type": "unavailable",
        }
        openai_client = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
        stream = await openai_client.chat.completions.create(model="m", messages=[], stream=True)
        with pytest.raises(openai.APIError, match="shard 1 exited") as failure:
            async for _ in stream:
                pass
        assert failure.value.body["type"] == "server_error" and failure.value.body["code"] == "unavailable"
