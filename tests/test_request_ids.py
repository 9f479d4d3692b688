"""Clients' request ids (router/request_ids.py): X-Request-Id (gRPC metadata x-request-id) taken with a
request, written on its log lines beside the router's id, and sent back on the HTTP answer."""

import asyncio
import re

import aiohttp
import grpc
import pytest
from transformers import AutoTokenizer

from app_without_shards import client_without_shards
from child_processes import free_port
from mixserve.router import request_ids
from mixserve.router.errors import BadRequest
from mixserve.router.server import ServerConfig
from mixserve_pb import generate_pb2, generate_pb2_grpc


def test_an_id_is_visible_ascii_and_stays_with_the_requests_submitted_under_it():
    for value in ("abc", "7f3e-91", "a" * 128, "gw/trace:1;span=2"):
        assert request_ids.check(value) == value
    for value in ("", "a" * 129, "two words", "caf\u00e9", "tab\there"):
        with pytest.raises(BadRequest, match="X-Request-Id must be 1 to 128 visible ASCII"):
            request_ids.check(value)
    assert request_ids.current.get() is None
    with request_ids.taken("outer"):
        with request_ids.taken(None):
            assert request_ids.current.get() == "outer"  # a request without an id leaves it as it was
        with request_ids.taken("inner"):
            assert request_ids.current.get() == "inner"
        assert request_ids.current.get() == "outer"
    assert request_ids.current.get() is None
    assert request_ids.log_field(None) == "" and request_ids.log_field("x1") == " request_id=x1"


async def test_the_answer_carries_it_back(demo_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    async with client_without_shards(tokenizer, tmp_path, ServerConfig(model_id="demo", api_key="k")) as client:
        for path, status in (("/info", 200), ("/tokenizer_info", 200)):
            headers = {"X-Request-Id": "gw-42", "Authorization": "Bearer k"}
            response = await client.get(path, headers=headers)
            assert response.status == status and response.headers["X-Request-Id"] == "gw-42"
        refused = await client.get("/info", headers={"X-Request-Id": "gw-43"})  # no key: still its id
        assert refused.status == 401 and refused.headers["X-Request-Id"] == "gw-43"
        bad = await client.get("/info", headers={"X-Request-Id": "two words", "Authorization": "Bearer k"})
        assert bad.status == 400 and "X-Request-Id" not in bad.headers
        assert (await bad.json())["error_type"] == "bad_request"
        plain = await client.get("/info", headers={"Authorization": "Bearer k"})
        assert "X-Request-Id" not in plain.headers


@pytest.mark.slow
async def test_the_log_finds_a_request_by_the_clients_id(launch, demo_dir):
    """The log is the contract: an operator looks a client's request up by the id its gateway sent."""
    grpc_port = free_port()
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--grpc-port", str(grpc_port))
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200 and "X-Request-Id" not in response.headers
        headers = {"X-Request-Id": "chat-0001"}
        async with session.post(f"{server.url}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == 200 and response.headers["X-Request-Id"] == "chat-0001"
        # Two choices: both requests carry it. A streamed /predict left after its first chunk: cancelled with it.
        async with session.post(f"{server.url}/v1/completions", json={"prompt": "The", "max_tokens": 3, "n": 2},
                                headers={"X-Request-Id": "cmpl-0002"}) as response:  # fmt: skip
            assert response.status == 200
        streamed = {"prompt": "The old river", "max_tokens": 200, "stream": True}
        async with session.post(f"{server.url}/predict", json=streamed, headers={"X-Request-Id": "left-0003"}) as r:
            assert r.headers["X-Request-Id"] == "left-0003"
            await r.content.readany()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        request = generate_pb2.GenerateRequest(prompt="The", parameters=generate_pb2.GenerationParameters())
        request.parameters.max_new_tokens = 2
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        await stub.Generate(request, metadata=(("x-request-id", "grpc-0004"),), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Generate(request, metadata=(("x-request-id", "no spaces please"),), timeout=60)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def lines() -> str:
        return server.contract_log("a client's request id on the lines of its requests, for operators to look up")

    for _ in range(100):  # the cancelled stream's line comes once the router sees the client gone
        if "request_id=left-0003" in lines():
            break
        await asyncio.sleep(0.1)
    log = lines()
    assert len(re.findall(r"event=finished id=req-\d+ .* request_id=chat-0001\n", log)) == 1
    assert len(re.findall(r"event=finished id=req-\d+ .* request_id=cmpl-0002\n", log)) == 2
    assert re.search(r"event=cancelled id=req-\d+ generated=\d+ request_id=left-0003\n", log)
    assert len(re.findall(r"event=finished id=req-\d+ .* request_id=grpc-0004\n", log)) == 1
    # A request without an id is logged as before.
    assert len(re.findall(r"event=finished id=req-\d+ .* speculative_accepted=\d+\n", log)) == 1
    server.stop()  # free the CPU for the modules after this one
