"""OpenAI's Predicted Outputs through real servers: a request with a `prediction` proposes its tokens (on a
server without --speculate, 1 shard, multi-step decode on; and on 2 tensor-parallel shards with
--speculate 3 and single steps), its output stays the one without the prediction (greedy and seeded,
good, edited and useless predictions, a stop inside an accepted run, a JSON schema), and `usage` says how many proposed
tokens were kept and not, also to the official OpenAI client; gRPC reports the counts; KV blocks all back
at the end; malformed predictions are refused."""

import json

import aiohttp
import grpc
import openai
import pytest
from transformers import AutoTokenizer

from child_processes import free_port
from json_schemas import SMALL_JSON_SCHEMA
from launched_server import servers_side_by_side
from mixserve.router.speculation import OWN_K
from mixserve_pb import generate_pb2 as pb
from mixserve_pb import generate_pb2_grpc

pytestmark = pytest.mark.slow

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 5}


@pytest.fixture(scope="module")
def servers(demo_dir, tmp_path_factory):
    """`plain`: 1 shard, no --speculate (multi-step decode on); `k3_tp2`: 2 tensor-parallel shards with
    --speculate 3, one step a round trip, and a gRPC port. Started side by side."""
    flags = ["--model", str(demo_dir), "--max-kv-blocks", "256", "--block-size", "4"]
    flags += ["--max-batch-prefill-tokens", "64"]
    grpc_port = free_port()
    variants = {
        "plain": ["--num-shard", "1"],
        "k3_tp2": ["--num-shard", "2", "--speculate", "3", "--max-decode-steps", "1", "--grpc-port", str(grpc_port)],
    }
    for started in servers_side_by_side(tmp_path_factory, flags, variants):
        started["k3_tp2"].grpc_address = f"127.0.0.1:{grpc_port}"
        yield started


async def complete(session: aiohttp.ClientSession, url: str, **fields) -> dict:
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, **fields}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def edited(text: str) -> str:
    """`text` with a stretch of its middle replaced, as a client's stale copy of a file would differ."""
    third = len(text) // 3
    return text[:third] + " zebra lantern 17 " + text[2 * third :]


async def test_predictions_keep_the_output_and_report_what_was_kept(servers):
    async with aiohttp.ClientSession() as session:
        plain = servers["plain"].url
        expected = (await complete(session, plain))["choices"][0]["text"]
        expected_seeded = (await complete(session, plain, **SEEDED))["choices"][0]["text"]
        assert len(expected) > 20
        for name, server in servers.items():
            url = server.url
            good = await complete(session, url, prediction={"type": "content", "content": expected})
            assert good["choices"][0]["text"] == expected, name
            details = good["usage"]["completion_tokens_details"]
            generated = good["usage"]["completion_tokens"]
            # Many tokens came as kept proposals (a step's last token is the model's own; how many also depends
            # on the output's text tokenizing back to its tokens: 29-34 of 40 here).
            assert details["accepted_prediction_tokens"] >= generated // 4, (name, details, generated)
            # Edited, as text parts: the output leaves the prediction and finds its place again.
            parts = [{"type": "text", "text": t} for t in (edited(expected)[:10], edited(expected)[10:])]
            stale = await complete(session, url, prediction={"type": "content", "content": parts})
            assert stale["choices"][0]["text"] == expected, name
            details = stale["usage"]["completion_tokens_details"]
            assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] > 0, name
            # A useless prediction proposes little, and changes nothing.
            useless = await complete(session, url, prediction={"type": "content", "content": "zebra " * 30})
            assert useless["choices"][0]["text"] == expected, name
            assert useless["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == 0, name
            # Seeded sampling keeps its draws; a stop string lands inside an accepted run.
            seeded = await complete(session, url, prediction={"type": "content", "content": expected_seeded}, **SEEDED)
            assert seeded["choices"][0]["text"] == expected_seeded, name
            stop = expected[12:16]
            cut = await complete(session, url, prediction={"type": "content", "content": expected}, stop=[stop])
            assert cut["choices"][0]["text"] == expected[: expected.index(stop)], name
            async with session.get(f"{url}/info") as response:
                before = await response.json()
            assert "completion_tokens_details" not in (await complete(session, url))["usage"]
            async with session.get(f"{url}/info") as response:
                state = await response.json()
            assert state["kv_blocks_used"] == 0 and state["speculative_accepted_tokens"] > 0, name
            if name == "plain":  # without --speculate, a request without a prediction proposes nothing
                assert state["speculative_proposed_tokens"] == before["speculative_proposed_tokens"]


async def test_an_exact_prediction_is_kept_from_the_first_step_where_the_output_starts_without_a_space(
    servers, demo_dir
):
    """The prediction is tokenized as the output spells it going on from the prompt: an output that starts
    without a space (the demo's Llama-style tokenizer starts a text alone with a space piece) has all its
    proposals kept from the step after the prefill: OWN_K of them in one step, where OWN_K + 2 tokens are
    asked. (An output whose text tokenizes back to other tokens could not be predicted exactly: skipped.)"""
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    url, max_tokens = servers["plain"].url, OWN_K + 2
    async with aiohttp.ClientSession() as session:
        for prompt in ("a mill on the hill", "The end", "x = 1\n", "(a, b)", "hill mill hill"):
            fields = {"logprobs": 0, "return_tokens_as_token_ids": True}
            choice = (await complete(session, url, prompt=prompt, max_tokens=max_tokens, **fields))["choices"][0]
            expected, ids = choice["text"], [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
            spelled_back = tokenizer.encode(prompt + expected) == tokenizer.encode(prompt) + ids
            if not expected[0].isspace() and spelled_back:
                break
        else:
            raise AssertionError("no prompt's output starts without a space and tokenizes back to its tokens")
        prediction = {"type": "content", "content": expected}
        answer = await complete(session, url, prompt=prompt, max_tokens=max_tokens, prediction=prediction)
    assert answer["choices"][0]["text"] == expected
    details = answer["usage"]["completion_tokens_details"]
    assert details == {"accepted_prediction_tokens": OWN_K, "rejected_prediction_tokens": 0}, (expected, details)


async def test_a_constrained_request_keeps_its_grammar_with_a_prediction(servers):
    """A JSON-schema request with a prediction: its rows masked by the grammar after the proposals before them
    (forced tokens first, the prediction's where the model chooses), its output the one without."""
    response_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": SMALL_JSON_SCHEMA}}
    async with aiohttp.ClientSession() as session:
        for name, server in servers.items():
            fields = {"response_format": response_format, "max_tokens": 48}
            expected = (await complete(session, server.url, **fields))["choices"][0]["text"]
            assert json.loads(expected).keys() == {"name", "n", "ok"}, name
            prediction = {"type": "content", "content": expected}
            answer = await complete(session, server.url, prediction=prediction, **fields)
            assert answer["choices"][0]["text"] == expected, name
            assert answer["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0, name


async def test_the_openai_client_sends_a_prediction_and_reads_its_counts(servers):
    """The official client's own `prediction` argument and usage types, streamed chat with usage."""
    client = openai.AsyncOpenAI(base_url=f"{servers['plain'].url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Write f again."}]
    plain = await client.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0)
    expected = plain.choices[0].message.content
    stream = await client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=32,
        temperature=0,
        prediction={"type": "content", "content": expected},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    usage = chunks[-1].usage
    assert usage.completion_tokens_details.accepted_prediction_tokens >= usage.completion_tokens // 4
    assert usage.completion_tokens_details.rejected_prediction_tokens is not None


async def test_grpc_takes_a_prediction_and_reports_the_counts(servers):
    server = servers["k3_tp2"]
    params = {"max_new_tokens": 40, "temperature": 0}
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        plain = await stub.Generate(pb.GenerateRequest(prompt=PROMPT, parameters=pb.GenerationParameters(**params)))
        request = pb.GenerateRequest(prompt=PROMPT, parameters=pb.GenerationParameters(**params, prediction=plain.text))
        predicted = await stub.Generate(request)
        messages = [m async for m in stub.GenerateStream(request)]
    assert predicted.text == plain.text
    assert predicted.speculative_accepted >= predicted.generated_tokens // 4
    assert predicted.speculative_accepted > plain.speculative_accepted
    assert "".join(m.token.text for m in messages) == plain.text
    assert messages[-1].speculative_accepted == predicted.speculative_accepted


@pytest.mark.parametrize(
    "prediction, status",
    [
        ("just text", 400),
        ({"type": "file", "content": "x"}, 422),
        ({"type": "content", "content": 7}, 400),
        ({"type": "content", "content": [{"type": "image_url", "image_url": {}}]}, 422),
        ({"type": "content", "content": [{"type": "text", "text": 3}]}, 422),
    ],
)
async def test_malformed_predictions_are_refused(servers, prediction, status):
    body = {"prompt": PROMPT, "max_tokens": 4, "prediction": prediction}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{servers['plain'].url}/v1/completions", json=body) as response:
            assert response.status == status
            error = (await response.json())["error"]
    assert "prediction" in error["message"]
