"""`POST /predict` through a real `mixserve launch` of the demo checkpoint with 4 shards."""

import asyncio
from pathlib import Path

import aiohttp
import pytest
import torch
from transformers import AutoTokenizer
from transformers import MixtralForCausalLM as ReferenceMixtral

from launched_server import await_until, get_text, metric
from mixserve.shards import demo

pytestmark = pytest.mark.slow

PREFILL_BUDGET = 48
KINDS = ("prefill", "decode", "mixed")


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    # fp32 as the transformers oracle (auto would be bf16 on a CPU with avx512_bf16).
    return launch(
        "--model", str(demo_dir), "--num-shard", "4", "--max-batch-prefill-tokens", str(PREFILL_BUDGET),
        "--max-concurrent-requests", "64", "--dtype", "float32",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def reference(demo_dir, tokenizer):
    """Greedy text from transformers' MixtralForCausalLM: the oracle for every greedy answer."""
    model = ReferenceMixtral.from_pretrained(demo_dir, dtype=torch.float32).eval()

    def generate(prompt_ids: list[int], max_new_tokens: int) -> str:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2
            )
        new = out[0, len(prompt_ids) :].tolist()
        if new and new[-1] == 2:
            new = new[:-1]
        # The text as it continues the prompt (a leading space is kept, as in a streamed answer).
        before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        after = tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
        assert after.startswith(before)
        return after[len(before) :]

    return generate


async def predict(url: str, body: dict, **kwargs) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/predict", json=body, **kwargs) as response:
            return response.status, await response.text()


async def predict_json(url: str, body: dict) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/predict", json={**body, "stream": False}) as response:
            assert response.status == 200, await response.text()
            return await response.json()


async def info(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/info") as response:
            return await response.json()


def words(n: int, offset: int = 0) -> str:
    vocab = ["river", "stone", "light", "green", "market", "quiet", "north", "paper", "window", "seven"]
    return " ".join(vocab[(i * 7 + offset) % len(vocab)] for i in range(n))


async def test_streamed_and_json_greedy_equal_the_reference(server, tokenizer, reference):
    prompt = "The old river runs"
    expected = reference(tokenizer(prompt)["input_ids"], 24)
    status, streamed = await predict(server.url, {"prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert status == 200
    assert streamed == expected
    answer = await predict_json(server.url, {"prompt": prompt, "max_new_tokens": 24, "top_k": 1})
    assert answer["output"] == expected
    assert answer["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    assert answer["finish_reason"] in ("length", "eos_token")


async def test_messages_use_the_chat_template(server, tokenizer, reference):
    messages = [{"role": "user", "content": "Name a color."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer = await predict_json(server.url, {"messages": messages, "max_tokens": 12, "temperature": 0})
    assert answer["output"] == reference(ids, 12)
    assert answer["prompt_tokens"] == len(ids)


async def test_stop_sequence_ends_the_text_before_it(server, tokenizer, reference):
    prompt = "A quiet market"
    full = reference(tokenizer(prompt)["input_ids"], 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    answer = await predict_json(server.url, {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop]})
    assert answer["finish_reason"] == "stop_sequence"
    assert answer["output"] == full[: full.index(stop)]


async def test_concurrent_requests_share_forwards_and_match_alone(server):
    jobs = [(words(3 + 5 * i, i), 4 + 3 * (i % 5)) for i in range(16)]
    bodies = [{"prompt": p, "max_tokens": n, "temperature": 0} for p, n in jobs]
    expected = [(await predict_json(server.url, body))["output"] for body in bodies]
    before = await info(server.url)
    answers = await asyncio.gather(*(predict_json(server.url, body) for body in bodies))
    after = await info(server.url)
    assert [a["output"] for a in answers] == expected
    steps = after["steps"] - before["steps"]
    generated = after["generated_tokens"] - before["generated_tokens"]
    # More than 3 tokens a step on average: some steps held 4 sequences or more.
    assert steps < generated / 3, f"{steps} steps for {generated} tokens: requests did not share forwards"


def steps_by_kind(url: str) -> dict[str, float]:
    """Shard steps run so far by what they held (/metrics' mixserve_step_duration_seconds)."""
    text = get_text(f"{url}/metrics")
    return {kind: metric(text, f'mixserve_step_duration_seconds_count{{kind="{kind}"}}') for kind in KINDS}


async def test_long_prompt_is_chunked_while_streams_keep_decoding(server, tokenizer):
    """Every step of the long prompt's prefill also decodes the running streams (a `mixed` step, never a
    `prefill` one alone), and there are as many as chunks of --max-batch-prefill-tokens need."""
    async with aiohttp.ClientSession() as session:
        runners = [
            await session.post(f"{server.url}/predict", json={"prompt": words(4, i), "max_tokens": 60})
            for i in range(2)
        ]
        for r in runners:
            await r.content.read(1)  # both are decoding now
        long_prompt = words(150)
        n_prompt = len(tokenizer(long_prompt)["input_ids"])
        assert n_prompt > 3 * PREFILL_BUDGET
        before, hits_before = await asyncio.to_thread(steps_by_kind, server.url), await info(server.url)
        answer = await predict_json(server.url, {"prompt": long_prompt, "max_tokens": 2})
        after, hits_after = await asyncio.to_thread(steps_by_kind, server.url), await info(server.url)
        assert answer["prompt_tokens"] == n_prompt
        for r in runners:
            await r.read()
            r.release()
    assert after["prefill"] == before["prefill"], "running streams skipped a step during prefill"
    # A prompt prefix found in the prefix cache is not computed again.
    computed = n_prompt - (hits_after["prefix_cache_hit_tokens"] - hits_before["prefix_cache_hit_tokens"])
    assert computed > 3 * PREFILL_BUDGET
    chunks = after["mixed"] - before["mixed"]
    assert chunks >= -(-computed // PREFILL_BUDGET), f"{chunks} steps prefilled {computed} tokens"


async def test_a_long_prompts_greedy_answer_equals_the_reference(server, tokenizer, reference):
    """A prompt of several chunks of --max-batch-prefill-tokens, each of more than 32 positions: the shards'
    decoder-layer kernel attends such chunks in tiles (prefill_attention.c), as a whole prompt would be."""
    corpus = (Path(demo.__file__).parent / "corpus.txt").read_text().splitlines()
    prompt = " ".join(corpus[40:50])
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > 4 * PREFILL_BUDGET
    answer = await predict_json(server.url, {"prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert answer["prompt_tokens"] == len(ids)
    assert answer["output"] == reference(ids, 24)


async def test_disconnected_stream_frees_its_blocks(server):
    before = await info(server.url)
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{server.url}/predict", json={"prompt": "window", "max_tokens": 400})
        await response.content.read(1)
        assert (await info(server.url))["kv_blocks_used"] > 0
        response.close()

    async def freed() -> bool:
        now = await info(server.url)
        return now["cancelled_requests"] > before["cancelled_requests"] and now["kv_blocks_used"] == 0

    await await_until(freed, "the stream's cancellation counted and its blocks freed", 10)
    now = await info(server.url)
    assert now["cancelled_requests"] == before["cancelled_requests"] + 1
    assert now["kv_blocks_used"] == 0 and now["requests_running"] == 0


@pytest.mark.parametrize(
    "body, status, error_type, needle",
    [
        (b"{not json", 400, "bad_request", "not valid JSON"),
        (b'{"prompt": 5}', 400, "bad_request", "prompt"),
        (b'{"prompt": "a \\udc00"}', 400, "bad_request", "surrogate"),
        (b'{"prompt": "x", "temperature": -1}', 422, "validation", "temperature"),
        (b'{"prompt": "x", "max_tokens": 100000}', 422, "validation", "max_total_tokens"),
        (b'{"messages": [{"role": "assistant", "content": "x"}]}', 422, "validation", "chat template"),
        (b'{"prompt": "x", "max_tokens": 0}', 422, "validation", "max_tokens"),
        (b"x" * (3 << 20), 413, "payload_too_large", "exceeds"),
    ],
    ids=[
        "malformed-json",
        "wrong-type",
        "lone-surrogate",
        "out-of-range",
        "over-max-total",
        "bad-chat",
        "zero-tokens",
        "too-large",
    ],
)
async def test_errors_are_json_with_the_right_status(server, body, status, error_type, needle):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/predict", data=body) as response:
            assert response.status == status
            payload = await response.json()
    assert payload["error_type"] == error_type
    assert needle in payload["error"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/health") as response:
            assert response.status == 200
    status, text = await predict(server.url, {"prompt": "paper", "max_tokens": 3})
    assert status == 200 and text
