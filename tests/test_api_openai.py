"""The OpenAI API through the official `openai` package (sync and async) against a real 2-shard launch."""

import json
import math

import aiohttp
import openai
import pytest
from transformers import AutoTokenizer

from launched_server import await_until
from launched_server import post_text as post

pytestmark = pytest.mark.slow

MAX_TOTAL = 48
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    # Strict model names: the tests below check the 404 for another model's name.
    args = ["--num-shard", "2", "--max-kv-blocks", "256", "--max-total-tokens", str(MAX_TOTAL), "--strict-model-name"]
    server = launch("--model", str(demo_dir), *args)
    yield server
    server.stop()  # free the CPU for the modules after this one


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


async def predict(url: str, **body) -> dict:
    """The greedy oracle: /predict's answer for the same prompt or chat."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/predict", json={**body, "stream": False, "temperature": 0}) as response:
            assert response.status == 200, await response.text()
            return await response.json()


def server_model(client) -> str:
    return client.models.list().data[0].id


def chat_ids(tokenizer, messages) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


async def test_chat_sync_greedy_matches_predict_with_real_usage(server, client, tokenizer):
    expected = await predict(server.url, messages=CHAT, max_tokens=12)
    answer = client.chat.completions.create(model=server_model(client), messages=CHAT, max_tokens=12, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected["output"]
    assert choice.finish_reason == "length" and choice.logprobs is None
    n_prompt = len(chat_ids(tokenizer, CHAT))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (n_prompt, 12)
    assert answer.usage.total_tokens == n_prompt + 12


async def test_chat_stream_role_first_usage_last(server, client):
    expected = await predict(server.url, messages=CHAT, max_tokens=10)
    stream = client.chat.completions.create(
        model="mixtral-demo", messages=CHAT, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == expected["output"]
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


async def test_completions_async_prompt_list_and_n(server, aclient, tokenizer):
    prompts = ["The old river", "A quiet market"]
    expected = [(await predict(server.url, prompt=p, max_tokens=6))["output"] for p in prompts]
    answer = await aclient.completions.create(model="mixtral-demo", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert answer.object == "text_completion"
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert [c.text for c in answer.choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert answer.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert answer.usage.completion_tokens == 4 * 6


async def test_completions_async_stream_and_default_max_tokens(server, aclient):
    expected = await predict(server.url, prompt="The old river", max_tokens=16)
    stream = await aclient.completions.create(model="mixtral-demo", prompt="The old river", temperature=0, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == expected["output"]  # OpenAI's default max_tokens is 16
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_chat_async_defaults_fill_the_context(server, aclient, tokenizer):
    answer = await aclient.chat.completions.create(model="mixtral-demo", messages=CHAT, temperature=0)
    n_prompt = len(chat_ids(tokenizer, CHAT))
    assert answer.usage.prompt_tokens == n_prompt
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.completion_tokens == MAX_TOTAL - n_prompt


async def test_sse_framing(server):
    body = {"messages": CHAT, "max_tokens": 3, "temperature": 0, "stream": True}
    status, content_type, text = await post(server.url, "/v1/chat/completions", body)
    assert status == 200 and content_type.startswith("text/event-stream")
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in p["choices"][0]["delta"] for p in payloads[1:])
    assert "usage" not in payloads[1]  # only with stream_options.include_usage


async def test_closed_stream_cancels_every_choice(server):
    async def info(session) -> dict:
        async with session.get(f"{server.url}/info") as response:
            return await response.json()

    body = {"messages": CHAT, "max_tokens": 30, "n": 2, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        before = await info(session)
        response = await session.post(f"{server.url}/v1/chat/completions", json=body)
        await response.content.readline()
        response.close()

        async def freed() -> bool:
            now = await info(session)
            return now["cancelled_requests"] == before["cancelled_requests"] + 2 and now["kv_blocks_used"] == 0

        await await_until(freed, "both choices cancelled and their blocks freed", 10)
        now = await info(session)
    assert now["cancelled_requests"] == before["cancelled_requests"] + 2
    assert now["kv_blocks_used"] == 0 and now["requests_running"] == 0


async def test_logprobs(server, client):
    answer = client.chat.completions.create(
        model="mixtral-demo", messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content).strip() == answer.choices[0].message.content.strip()
    for token in content:
        assert len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True) and math.isclose(token.logprob, values[0], rel_tol=1e-6)
        assert token.bytes == list(token.token.encode())
    legacy = client.completions.create(model="mixtral-demo", prompt="The old", max_tokens=3, temperature=0, logprobs=2)
    logprobs = legacy.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert all(2 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


async def test_responses_logprobs_are_the_chat_requests(server, client):
    """The Responses API's include message.output_text.logprobs with top_logprobs: each output token's entry as
    the same chat request has it; streamed, the deltas' entries add up to the same."""
    chat = client.chat.completions.create(
        model="mixtral-demo", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    expected = [token.model_dump() for token in chat.choices[0].logprobs.content]
    kwargs = dict(model="mixtral-demo", input=CHAT, max_output_tokens=5, temperature=0, top_logprobs=2)
    whole = client.responses.create(include=["message.output_text.logprobs"], **kwargs)
    part = whole.output[0].content[0]
    assert part.text == chat.choices[0].message.content and len(part.logprobs) == 5
    assert [entry.model_dump() for entry in part.logprobs] == expected
    events = list(client.responses.create(include=["message.output_text.logprobs"], stream=True, **kwargs))
    deltas = [entry.model_dump() for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    assert deltas == expected
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [entry.model_dump() for entry in done.logprobs] == expected
    plain = client.responses.create(**{**kwargs, "top_logprobs": None})
    assert plain.output[0].content[0].logprobs == []


async def test_stop_seed_and_n(server, client):
    full = client.completions.create(model="mixtral-demo", prompt="A quiet market", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(
        model="mixtral-demo", prompt="A quiet market", max_tokens=12, temperature=0, stop=stop
    )
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    sampled = [
        client.chat.completions.create(model="mixtral-demo", messages=CHAT, max_tokens=8, seed=7, n=2, top_p=0.9)
        for _ in range(2)
    ]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1], "the same seed must give the same choices"
    assert texts[0][0] != texts[0][1], "choice i is seeded seed + i"
    assert sampled[0].usage.completion_tokens == 16


async def test_models(server, client):
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].object == "model"
    model_id = models.data[0].id
    assert model_id.endswith("mixtral-demo")
    assert client.models.retrieve("mixtral-demo").id == model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": CHAT, "temperature": 3}, 422, "temperature"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 422, "logprobs"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 6}, 422, "disagree"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 1000}, 422, "n must be"),
        ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-4"}, 404, "gpt-4"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_TOTAL}, 422, "max_total_tokens"),
        ("/v1/completions", {"prompt": [[1, 2, 99999]]}, 422, "vocabulary"),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, 422, "logprobs"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 3, "max_tokens": 5}, 422, "min_tokens"),
        ("/v1/completions", {}, 400, "prompt"),
    ],
    ids=["type", "messages-type", "range", "top-logprobs", "two-limits", "n", "model", "too-long", "token-ids",
         "logprobs-range", "min-tokens", "missing-prompt"],
)  # fmt: skip
async def test_errors_in_openai_shape(server, path, body, status, needle):
    got, _, text = await post(server.url, path, body)
    assert got == status, text
    payload = json.loads(text)
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]
    assert error["type"] == "invalid_request_error" and payload["error_type"] in (
        "bad_request",
        "validation",
        "not_found",
    )


async def test_client_raises_typed_errors_and_server_stays_healthy(server, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="mixtral-demo", messages=CHAT, temperature="hot")
    assert bad.value.code == "bad_request" and "temperature" in bad.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="mixtral-demo", prompt="x", top_p=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x")
    assert missing.value.code == "model_not_found"
    answer = client.completions.create(model="mixtral-demo", prompt="x", max_tokens=2, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 2
