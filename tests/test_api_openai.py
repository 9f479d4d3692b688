"""The OpenAI API through the official `openai` package (sync and async) against a real 2-shard launch."""

import json
import math

import aiohttp
import openai
import pytest
from transformers import AutoTokenizer

from launched_server import await_until

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


async def post(url: str, path: str, body: dict) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}{path}", json=body) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.text()


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


async def test_continuous_usage_stats_count_every_chunk(server, aclient):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far (two choices, one
    token a chunk), the last the final counts; without include_usage it does nothing."""
    stream = await aclient.completions.create(
        model="mixtral-demo", prompt="The old river", max_tokens=6, n=2, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    counted = [c.usage.completion_tokens for c in chunks[:-1]]
    # Each choice's 6 tokens, one a chunk (a token whose text is still incomplete has none of its own).
    assert counted == sorted(set(counted)) and counted[0] == 1 and counted[-1] == 12 and len(counted) >= 10
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens}
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    quiet = await aclient.completions.create(
        model="mixtral-demo", prompt="The old river", max_tokens=3, stream=True,
        stream_options={"continuous_usage_stats": True},
    )  # fmt: skip
    assert all(c.usage is None for c in [chunk async for chunk in quiet])


async def test_completions_without_special_tokens_are_the_bare_prompt(server, aclient, tokenizer):
    """vLLM's add_special_tokens: false on a string prompt: no BOS, the same as the bare prompt's token ids."""
    prompt = "The old river"
    bare = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    fields = {"model": "mixtral-demo", "max_tokens": 8, "temperature": 0}
    without = await aclient.completions.create(prompt=prompt, extra_body={"add_special_tokens": False}, **fields)
    as_ids = await aclient.completions.create(prompt=bare, **fields)
    default = await aclient.completions.create(prompt=prompt, **fields)
    assert without.usage.prompt_tokens == len(bare) == default.usage.prompt_tokens - 1
    assert without.choices[0].text == as_ids.choices[0].text


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


async def test_vllm_stop_fields_end_where_they_say(server, aclient, tokenizer):
    prompt = "The old river"
    plain = await aclient.completions.create(model="mixtral-demo", prompt=prompt, max_tokens=8, temperature=0)
    text = plain.choices[0].text
    tgi = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
    status, _, body = await post(server.url, "/generate", tgi)
    assert status == 200, body
    generated = json.loads(body)  # the same greedy tokens, with their ids
    ids = [t["id"] for t in generated["details"]["tokens"]]
    assert generated["generated_text"] == text
    # stop_token_ids: the request ends after the third token, whose text it keeps.
    stopped = await aclient.completions.create(
        model="mixtral-demo", prompt=prompt, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [ids[2]]}
    )
    first = min(i for i, t in enumerate(ids) if t == ids[2])
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == first + 1
    assert text.startswith(stopped.choices[0].text) and stopped.choices[0].text
    # include_stop_str_in_output keeps the stop string that include-less requests cut.
    stop = text.strip()[:3]
    cut, kept = [
        await aclient.completions.create(
            model="mixtral-demo", prompt=prompt, max_tokens=8, temperature=0, stop=[stop],
            extra_body={"include_stop_str_in_output": include},
        )
        for include in (False, True)
    ]  # fmt: skip
    assert kept.choices[0].text == cut.choices[0].text + stop == text[: text.index(stop) + len(stop)]


async def test_skip_special_tokens_false_keeps_their_text(server, aclient, tokenizer):
    eos = tokenizer.eos_token_id
    forced = {"logit_bias": {str(eos): 100}, "ignore_eos": True}  # EOS every step, not ending the request
    texts = [
        (
            await aclient.completions.create(
                model="mixtral-demo", prompt="x", max_tokens=2, extra_body={**forced, "skip_special_tokens": skip}
            )
        )
        .choices[0]
        .text
        for skip in (True, False)
    ]
    assert texts == ["", tokenizer.eos_token * 2]


async def test_min_p_one_draws_only_the_most_likely_token(server, aclient):
    greedy = await aclient.completions.create(model="mixtral-demo", prompt="The old river", max_tokens=8, temperature=0)
    for seed in range(3):
        sampled, narrowed = [
            await aclient.completions.create(
                model="mixtral-demo", prompt="The old river", max_tokens=8, temperature=1.5, seed=seed,
                extra_body={"min_p": min_p},
            )
            for min_p in (0.0, 1.0)
        ]  # fmt: skip
        assert narrowed.choices[0].text == greedy.choices[0].text
        assert sampled.choices[0].text != greedy.choices[0].text  # the draw is free without it


async def test_truncate_prompt_tokens_keeps_the_prompts_tail(server, aclient, tokenizer):
    prompt = "The old river runs past the mill"
    tail = tokenizer(prompt)["input_ids"][-3:]
    truncated = await aclient.completions.create(
        model="mixtral-demo", prompt=prompt, max_tokens=5, temperature=0, extra_body={"truncate_prompt_tokens": 3}
    )
    as_ids = await aclient.completions.create(model="mixtral-demo", prompt=tail, max_tokens=5, temperature=0)
    assert truncated.usage.prompt_tokens == 3 and truncated.choices[0].text == as_ids.choices[0].text


async def test_chat_template_fields_shape_the_prompt(server, aclient, tokenizer):
    turns = [*CHAT, {"role": "assistant", "content": "The color is"}]
    expected = tokenizer.apply_chat_template(turns, tokenize=False, continue_final_message=True)
    ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    answer = await aclient.chat.completions.create(
        model="mixtral-demo", messages=turns, max_tokens=4, temperature=0, extra_body={"continue_final_message": True}
    )
    # The assistant's message left open: the same tokens as the rendered prefix sent as a completion.
    plain = await aclient.completions.create(model="mixtral-demo", prompt=ids, max_tokens=4, temperature=0)
    assert answer.usage.prompt_tokens == len(ids) and answer.choices[0].message.content == plain.choices[0].text
    closed = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    no_prompt = await aclient.chat.completions.create(
        model="mixtral-demo", messages=CHAT, max_tokens=1, extra_body={"add_generation_prompt": False,
        "chat_template_kwargs": {"unused_variable": 1}},
    )  # fmt: skip
    assert no_prompt.usage.prompt_tokens == len(tokenizer(closed, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": "x", "min_p": 1.5}, "min_p"),
        ({"prompt": "x", "prompt_logprobs": 50}, "prompt_logprobs"),
        ({"prompt": "x", "use_beam_search": True}, "beam search"),
        ({"prompt": "x", "echo": True, "truncate_prompt_tokens": 2}, "truncate_prompt_tokens"),
        ({"prompt": "x", "stop_token_ids": [-1]}, ">= 0"),
        ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids must not be empty"),
        ({"prompt": "x", "allowed_token_ids": [1, 10**6]}, "allowed_token_ids names token id 1000000"),
        ({"prompt": "x", "bad_words": ["fine", " "]}, "bad_words[1] must not be only white space"),
        ({"prompt": "x", "bad_words": ["w"] * 301}, "at most 300"),
        ({"prompt": "x", "request_id": ""}, "request_id must be a string"),
        ({"prompt": "x", "priority": 1}, "first come, first served"),
        ({"prompt": "x", "prompt_embeds": "AAAA"}, "prompt_embeds is not supported"),
        ({"prompt": "x", "kv_transfer_params": {"do_remote_decode": True}}, "no disaggregated prefill"),
        ({"prompt": "x", "vllm_xargs": {"k": 1}}, "vllm_xargs is not supported"),
        ({"messages": CHAT, "chat_template": "{{ messages }}"}, "chat_template is not supported"),
        ({"messages": CHAT, "echo": True}, "echo is not supported"),
        ({"messages": CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio is not supported"),
        ({"messages": CHAT, "modalities": ["text", "audio"]}, "modalities is not supported"),
        ({"messages": CHAT, "web_search_options": {}}, "no web search"),
        ({"messages": CHAT, "continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
        ({"messages": CHAT, "chat_template_kwargs": {"tools": []}}, "may not set tools"),
    ],
)
async def test_vllm_fields_refused_with_the_reason(server, body, needle):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, _, text = await post(server.url, path, body)
    assert status == 422 and needle in json.loads(text)["error"]["message"], text


async def test_vllm_fields_at_their_off_values_are_accepted(server):
    body = {
        "prompt": "x",
        "max_tokens": 2,
        "min_p": 0.0,
        "use_beam_search": False,
        "length_penalty": 1.0,
        "priority": 0,
    }
    status, _, text = await post(server.url, "/v1/completions", body)
    assert status == 200, text
    body = {"messages": CHAT, "max_tokens": 2, "modalities": ["text"], "audio": None, "web_search_options": None}
    body |= {"store": False, "service_tier": "auto", "user": "u1", "metadata": {"k": "v"}}
    status, _, text = await post(server.url, "/v1/chat/completions", body)
    assert status == 200, text


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


async def test_tokens_as_token_ids_and_request_id(server, client, tokenizer):
    # vLLM's return_tokens_as_token_ids: each logprobs token (and alternative) is "token_id:N", N its id.
    extra = {"return_tokens_as_token_ids": True, "request_id": "job-7"}
    chat = client.chat.completions.create(
        model="mixtral-demo",
        messages=CHAT,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=extra,
    )
    content = chat.choices[0].logprobs.content
    ids = [int(t.token.removeprefix("token_id:")) for t in content]
    assert tokenizer.decode(ids) == chat.choices[0].message.content and chat.id == "chatcmpl-job-7"
    assert all(top.token.startswith("token_id:") for t in content for top in t.top_logprobs)
    legacy = client.completions.create(
        model="mixtral-demo", prompt="The old", max_tokens=3, temperature=0, logprobs=1, echo=True, extra_body=extra
    )
    logprobs = legacy.choices[0].logprobs
    prompt_ids = tokenizer("The old")["input_ids"]
    assert [int(t.removeprefix("token_id:")) for t in logprobs.tokens][: len(prompt_ids)] == prompt_ids
    assert all(k.startswith("token_id:") for top in logprobs.top_logprobs[1:] for k in top)
    assert legacy.id == "cmpl-job-7"
    streamed = client.completions.create(
        model="mixtral-demo", prompt="The old", max_tokens=3, temperature=0, logprobs=0, stream=True, extra_body=extra
    )
    assert all(t.startswith("token_id:") for chunk in streamed for t in chunk.choices[0].logprobs.tokens)


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
