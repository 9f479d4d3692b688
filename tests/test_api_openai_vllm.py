"""vLLM's extensions to the OpenAI API (sampling, output and template fields, and the ones refused) through the
official `openai` package against a real launch."""

import json

import openai
import pytest

from launched_server import post_text as post

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--max-kv-blocks", "256", "--max-total-tokens", "48")
    yield server
    server.stop()  # free the CPU for the modules after this one


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


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


async def test_completions_without_special_tokens_are_the_bare_prompt(server, aclient, demo_tokenizer):
    """vLLM's add_special_tokens: false on a string prompt: no BOS, the same as the bare prompt's token ids."""
    prompt = "The old river"
    bare = demo_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    fields = {"model": "mixtral-demo", "max_tokens": 8, "temperature": 0}
    without = await aclient.completions.create(prompt=prompt, extra_body={"add_special_tokens": False}, **fields)
    as_ids = await aclient.completions.create(prompt=bare, **fields)
    default = await aclient.completions.create(prompt=prompt, **fields)
    assert without.usage.prompt_tokens == len(bare) == default.usage.prompt_tokens - 1
    assert without.choices[0].text == as_ids.choices[0].text


async def test_vllm_stop_fields_end_where_they_say(server, aclient, demo_tokenizer):
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


async def test_skip_special_tokens_false_keeps_their_text(server, aclient, demo_tokenizer):
    eos = demo_tokenizer.eos_token_id
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
    assert texts == ["", demo_tokenizer.eos_token * 2]


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


async def test_truncate_prompt_tokens_keeps_the_prompts_tail(server, aclient, demo_tokenizer):
    prompt = "The old river runs past the mill"
    tail = demo_tokenizer(prompt)["input_ids"][-3:]
    truncated = await aclient.completions.create(
        model="mixtral-demo", prompt=prompt, max_tokens=5, temperature=0, extra_body={"truncate_prompt_tokens": 3}
    )
    as_ids = await aclient.completions.create(model="mixtral-demo", prompt=tail, max_tokens=5, temperature=0)
    assert truncated.usage.prompt_tokens == 3 and truncated.choices[0].text == as_ids.choices[0].text


async def test_chat_template_fields_shape_the_prompt(server, aclient, demo_tokenizer):
    turns = [*CHAT, {"role": "assistant", "content": "The color is"}]
    expected = demo_tokenizer.apply_chat_template(turns, tokenize=False, continue_final_message=True)
    ids = demo_tokenizer(expected, add_special_tokens=False)["input_ids"]
    answer = await aclient.chat.completions.create(
        model="mixtral-demo", messages=turns, max_tokens=4, temperature=0, extra_body={"continue_final_message": True}
    )
    # The assistant's message left open: the same tokens as the rendered prefix sent as a completion.
    plain = await aclient.completions.create(model="mixtral-demo", prompt=ids, max_tokens=4, temperature=0)
    assert answer.usage.prompt_tokens == len(ids) and answer.choices[0].message.content == plain.choices[0].text
    closed = demo_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    no_prompt = await aclient.chat.completions.create(
        model="mixtral-demo", messages=CHAT, max_tokens=1, extra_body={"add_generation_prompt": False,
        "chat_template_kwargs": {"unused_variable": 1}},
    )  # fmt: skip
    assert no_prompt.usage.prompt_tokens == len(demo_tokenizer(closed, add_special_tokens=False)["input_ids"])


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


async def test_tokens_as_token_ids_and_request_id(server, aclient, demo_tokenizer):
    # vLLM's return_tokens_as_token_ids: each logprobs token (and alternative) is "token_id:N", N its id.
    extra = {"return_tokens_as_token_ids": True, "request_id": "job-7"}
    chat = await aclient.chat.completions.create(
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
    assert demo_tokenizer.decode(ids) == chat.choices[0].message.content and chat.id == "chatcmpl-job-7"
    assert all(top.token.startswith("token_id:") for t in content for top in t.top_logprobs)
    legacy = await aclient.completions.create(
        model="mixtral-demo", prompt="The old", max_tokens=3, temperature=0, logprobs=1, echo=True, extra_body=extra
    )
    logprobs = legacy.choices[0].logprobs
    prompt_ids = demo_tokenizer("The old")["input_ids"]
    assert [int(t.removeprefix("token_id:")) for t in logprobs.tokens][: len(prompt_ids)] == prompt_ids
    assert all(k.startswith("token_id:") for top in logprobs.top_logprobs[1:] for k in top)
    assert legacy.id == "cmpl-job-7"
    streamed = await aclient.completions.create(
        model="mixtral-demo", prompt="The old", max_tokens=3, temperature=0, logprobs=0, stream=True, extra_body=extra
    )
    chunks = [chunk async for chunk in streamed]
    assert all(t.startswith("token_id:") for chunk in chunks for t in chunk.choices[0].logprobs.tokens)


async def test_return_token_ids_are_the_prompts_and_the_texts(server, demo_tokenizer):
    """vLLM's return_token_ids: the prompt's ids (the chat's rendered prompt, each completions prompt) and each
    choice's ids, which decode to its text; streamed, the prompt's with a choice's first chunk and each chunk's
    ids since the last, adding up to the same ids."""
    chat_prompt = demo_tokenizer(demo_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]  # fmt: skip
    fields = {"max_tokens": 6, "temperature": 0, "return_token_ids": True}
    status, _, text = await post(server.url, "/v1/chat/completions", {"messages": CHAT, "n": 2, **fields})
    chat = json.loads(text)
    assert status == 200 and chat["prompt_token_ids"] == chat_prompt
    for choice in chat["choices"]:
        assert len(choice["token_ids"]) == 6
        assert demo_tokenizer.decode(choice["token_ids"]) == choice["message"]["content"]
    status, _, text = await post(server.url, "/v1/chat/completions", {"messages": CHAT, "stream": True, **fields})
    chunks = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n")[:-2]]
    assert chunks[0]["prompt_token_ids"] == chat_prompt and all("prompt_token_ids" not in c for c in chunks[1:])
    assert [i for c in chunks[1:] for i in c["choices"][0]["token_ids"]] == chat["choices"][0]["token_ids"]

    prompts = ["The old river", "A"]  # "A" continues with byte tokens that spell no text alone
    body = {"prompt": prompts, **fields}
    status, _, text = await post(server.url, "/v1/completions", body)
    completion = json.loads(text)
    assert status == 200
    for prompt, choice in zip(prompts, completion["choices"], strict=True):
        assert choice["prompt_token_ids"] == demo_tokenizer(prompt)["input_ids"]
        assert demo_tokenizer.decode(choice["token_ids"]) == choice["text"] and len(choice["token_ids"]) == 6
    for i, prompt in enumerate(prompts):
        status, _, text = await post(server.url, "/v1/completions", {**body, "prompt": prompt, "stream": True})
        chunks = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n")[:-2]]
        assert chunks[0]["choices"][0]["prompt_token_ids"] == completion["choices"][i]["prompt_token_ids"]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == completion["choices"][i]["token_ids"]
    # With echo the text starts with the prompt, and so do the ids; the prompt scored alone is its ids only.
    status, _, text = await post(server.url, "/v1/completions", {**body, "prompt": prompts[0], "echo": True})
    echoed = json.loads(text)["choices"][0]
    assert echoed["token_ids"] == echoed["prompt_token_ids"] + completion["choices"][0]["token_ids"]
    scored = {**body, "prompt": prompts[0], "echo": True, "max_tokens": 0, "logprobs": 0}
    status, _, text = await post(server.url, "/v1/completions", scored)
    assert status == 200 and json.loads(text)["choices"][0]["token_ids"] == echoed["prompt_token_ids"]
    status, _, text = await post(server.url, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert "token_ids" not in json.loads(text)["choices"][0]  # only when asked
