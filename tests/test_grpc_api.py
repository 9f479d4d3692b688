"""The public gRPC service of a real `mixserve launch` (2 shards), through a client built from proto/."""

import asyncio
import os
import signal

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from child_processes import free_port
from launched_server import LaunchedServer, await_until
from mixserve_pb import generate_pb2 as pb
from mixserve_pb import generate_pb2_grpc

pytestmark = pytest.mark.slow

KEY = "grpc-sekret"
AUTH = (("authorization", f"Bearer {KEY}"),)
HTTP_AUTH = {"Authorization": f"Bearer {KEY}"}
SERVICE = "mixserve.generate.v1.GenerationService"
MAX_CONCURRENT = 2
# A small step budget and cache: shard warmup runs one largest step, which dominates startup on CPU.
SMALL = ("--max-batch-prefill-tokens", "64", "--max-batch-size", "8", "--max-kv-blocks", "256")


@pytest.fixture(scope="module")
def doomed(demo_dir, tmp_path_factory):
    """A throwaway server whose shard a test kills for good; it starts now, so it boots beside `server`."""
    grpc_port = free_port()
    args = ["--model", str(demo_dir), "--num-shard", "2", "--grpc-port", str(grpc_port), "--max-restarts", "0", *SMALL]
    server = LaunchedServer(args, tmp_path_factory.mktemp("doomed") / "server.log", free_port())
    server.grpc_address = f"127.0.0.1:{grpc_port}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(launch, demo_dir, doomed):
    grpc_port = free_port()
    started = launch(
        "--model", str(demo_dir), "--num-shard", "2", "--grpc-port", str(grpc_port), "--api-key", KEY,
        "--max-concurrent-requests", str(MAX_CONCURRENT), *SMALL,
    )  # fmt: skip
    started.grpc_address = f"127.0.0.1:{grpc_port}"
    return started


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def greedy(max_new_tokens: int, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens, temperature=0), **fields
    )


async def predict(server, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers=HTTP_AUTH) as session:
        async with session.post(f"{server.url}/predict", json={**body, "stream": False}) as response:
            return response.status, await response.json()


async def info(server) -> dict:
    async with aiohttp.ClientSession(headers=HTTP_AUTH) as session:
        async with session.get(f"{server.url}/info") as response:
            return await response.json()


async def test_stream_is_one_message_per_token_and_greedy_equals_predict(server, tokenizer):
    prompt = "The old river runs"
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        messages = [m async for m in stub.GenerateStream(greedy(20, prompt=prompt), metadata=AUTH)]
        unary = await stub.Generate(greedy(20, prompt=prompt), metadata=AUTH)
    status, http = await predict(server, {"prompt": prompt, "max_new_tokens": 20, "temperature": 0})
    assert status == 200
    assert "".join(m.token.text for m in messages) == http["output"] == unary.text
    assert [m.generated_tokens for m in messages] == list(range(1, len(messages) + 1))
    assert len(messages) == http["generated_tokens"] == unary.generated_tokens
    assert {m.prompt_tokens for m in messages} == {len(tokenizer(prompt)["input_ids"])} == {unary.prompt_tokens}
    assert [m.token.id for m in messages] == [t.id for t in unary.tokens]
    assert all(m.token.logprob < 0 for m in messages)
    assert [m.finish_reason for m in messages[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(messages) - 1)
    expected = {"length": pb.FINISH_REASON_LENGTH, "eos_token": pb.FINISH_REASON_EOS_TOKEN}[http["finish_reason"]]
    assert messages[-1].finish_reason == unary.finish_reason == expected


async def test_prompt_token_ids_are_the_prompt_as_given(server, tokenizer):
    prompt = "The old river runs"
    ids = tokenizer(prompt)["input_ids"]  # the BOS the string prompt gets, given here as an id
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        as_text = await stub.Generate(greedy(12, prompt=prompt), metadata=AUTH)
        as_ids = await stub.Generate(greedy(12, prompt_token_ids=ids), metadata=AUTH)
        without_bos = await stub.Generate(greedy(12, prompt_token_ids=ids[1:]), metadata=AUTH)
        for fields in ({"prompt_token_ids": [1, 10**6]}, {"prompt": prompt, "prompt_token_ids": ids}):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(greedy(4, **fields), metadata=AUTH)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert as_ids.text == as_text.text and as_ids.prompt_tokens == len(ids)
    assert without_bos.prompt_tokens == len(ids) - 1


async def test_chat_messages_and_stop_match_predict(server):
    chat = [{"role": "user", "content": "Name a color."}]
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        full = await stub.Generate(greedy(16, messages=[pb.ChatMessage(**m) for m in chat]), metadata=AUTH)
        stop = full.text[len(full.text) // 2 :][:3]
        request = greedy(16, messages=[pb.ChatMessage(**m) for m in chat])
        request.parameters.stop.append(stop)
        stopped = await stub.Generate(request, metadata=AUTH)
    _, http = await predict(server, {"messages": chat, "max_tokens": 16, "temperature": 0})
    assert full.text == http["output"]
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert stopped.text == full.text[: full.text.index(stop)]


async def test_tokenize_equals_the_tokenizer_and_model_info(server, tokenizer):
    chat = [{"role": "user", "content": "Hi there"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        raw = await stub.Tokenize(pb.TokenizeRequest(prompt="quiet north window"), metadata=AUTH)
        templated = await stub.Tokenize(pb.TokenizeRequest(messages=[pb.ChatMessage(**chat[0])]), metadata=AUTH)
        model = await stub.ModelInfo(pb.ModelInfoRequest(), metadata=AUTH)
    assert list(raw.ids) == tokenizer("quiet north window")["input_ids"]
    assert list(raw.pieces) == tokenizer.convert_ids_to_tokens(list(raw.ids))
    assert list(templated.ids) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    http = await info(server)
    assert (model.num_shard, model.max_concurrent_requests) == (2, MAX_CONCURRENT)
    assert (model.max_total_tokens, model.kv_blocks_total) == (http["max_total_tokens"], http["kv_blocks_total"])
    assert list(model.eos_token_ids) == [tokenizer.eos_token_id] and model.vocab_size == len(tokenizer)


@pytest.mark.parametrize(
    "fields, body",
    [
        (
            {"prompt": "x", "parameters": pb.GenerationParameters(temperature=-0.5)},
            {"prompt": "x", "temperature": -0.5},
        ),
        ({"prompt": "x", "parameters": pb.GenerationParameters(top_p=1.5)}, {"prompt": "x", "top_p": 1.5}),
        (
            {"prompt": "x", "parameters": pb.GenerationParameters(max_new_tokens=0)},
            {"prompt": "x", "max_new_tokens": 0},
        ),
        (
            {"prompt": "x", "parameters": pb.GenerationParameters(max_new_tokens=100000)},
            {"prompt": "x", "max_new_tokens": 100000},
        ),
        ({"prompt": "x", "parameters": pb.GenerationParameters(stop=[""])}, {"prompt": "x", "stop": [""]}),
        ({"prompt": "x", "parameters": pb.GenerationParameters(priority=2)}, {"prompt": "x", "priority": 2}),
        ({"prompt": ""}, {"prompt": ""}),
        ({}, {}),
        (
            {"prompt": "x", "messages": [pb.ChatMessage(role="user", content="y")]},
            {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        ),
        (
            {"messages": [pb.ChatMessage(role="assistant", content="x")]},
            {"messages": [{"role": "assistant", "content": "x"}]},
        ),
    ],
    ids=[
        "temperature",
        "top-p",
        "zero-tokens",
        "over-max-total",
        "empty-stop",
        "priority-under-fcfs",
        "empty-prompt",
        "no-input",
        "both",
        "chat",
    ],
)
async def test_invalid_requests_are_invalid_argument_with_the_http_message(server, fields, body):
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(pb.GenerateRequest(**fields), metadata=AUTH)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("error-type", "validation") in tuple(error.trailing_metadata())
    status, http = await predict(server, body)
    assert status == 422 and error.details() == http["error"]


async def test_api_key_in_metadata_while_health_and_reflection_stay_open(server):
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", KEY),)]:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Tokenize(pb.TokenizeRequest(prompt="x"), metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.GenerateStream(greedy(2, prompt="x")):
                pass
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [
            r
            async for r in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert KEY not in server.contract_log("the API key never reaches the log")


async def test_cancelled_streams_free_their_blocks_and_overload_is_resource_exhausted(server):
    before = await info(server)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        calls = [stub.GenerateStream(greedy(400, prompt="stone"), metadata=AUTH) for _ in range(MAX_CONCURRENT)]
        for call in calls:
            await call.read()
        assert (await info(server))["kv_blocks_used"] > 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(greedy(2, prompt="x"), metadata=AUTH)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            call.cancel()

        async def freed() -> bool:
            now = await info(server)
            return (
                now["cancelled_requests"] == before["cancelled_requests"] + MAX_CONCURRENT and not now["kv_blocks_used"]
            )

        await await_until(freed, "the cancelled streams counted and their blocks freed", 10)
        now = await info(server)
        assert now["cancelled_requests"] == before["cancelled_requests"] + MAX_CONCURRENT
        assert now["kv_blocks_used"] == 0 and now["requests_running"] == 0
        assert now["generated_tokens"] - before["generated_tokens"] < 2 * 400
        answer = await stub.Generate(greedy(2, prompt="x"), metadata=AUTH)
        assert answer.generated_tokens == 2


async def test_dead_shard_is_unavailable_and_not_serving(doomed):
    await asyncio.to_thread(doomed.wait_healthy)
    pids = [shard.pid for shard in doomed.shards()]
    async with grpc.aio.insecure_channel(doomed.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        stream = stub.GenerateStream(greedy(2000, prompt="north"))
        await stream.read()
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while await stream.read() != grpc.aio.EOF:
                pass
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(greedy(2, prompt="x"))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "shards are unavailable" in raised.value.details()
        answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
