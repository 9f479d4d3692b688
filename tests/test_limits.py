"""Request limits of a real `mixserve launch` (1 shard): body size, slow headers and bodies, per-request bounds,
the queue bound, a burst of cancelled streams, and the per-request deadline. Every refusal is a clear status
with a JSON `{"error", "error_type"}` body (OpenAI's error object on the OpenAI routes)."""

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 4096
READ_TIMEOUT_S = 2
MAX_CONCURRENT = 16
CHAT = [{"role": "user", "content": "Name a river."}]
# Long enough that no stream below can end before the test is done with it.
LONG = 3000
# A generous bound on how long the server may take to act on a timeout or a disconnect: a failure, not a
# measurement (the 2-core machine is shared).
PATIENCE_S = 60


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch(
        "--model", str(demo_dir), "--num-shard", "1", "--max-body-bytes", str(MAX_BODY_BYTES),
        "--read-timeout", str(READ_TIMEOUT_S), "--max-concurrent-requests", str(MAX_CONCURRENT),
        "--max-stop-sequences", "2", "--max-top-n-tokens", "2", "--max-choices", "2",
    )  # fmt: skip
    yield server
    server.stop()  # free the CPU for the modules after this one


async def post(url: str, path: str, body: dict | bytes) -> tuple[int, dict]:
    """One request on its own connection (the server closes idle ones after --read-timeout)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        payload = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with session.post(f"{url}{path}", **payload) as response:
            return response.status, await response.json(content_type=None)


def error_type(body: dict) -> str:
    """`error_type` sits at the top level in both error shapes (plain and OpenAI's)."""
    return body["error_type"]


async def gauges(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
            elif sample.name == "mixserve_request_end_total":
                values[f"end_{sample.labels['reason']}"] = sample.value
    return values


async def settled(url: str) -> dict[str, float]:
    """The gauges once nothing is queued or running any more (the server acts on cancellations in its loop)."""
    for _ in range(PATIENCE_S * 10):
        values = await gauges(url)
        if values["mixserve_queue_size"] == values["mixserve_batch_size"] == 0:
            return values
        await asyncio.sleep(0.1)
    raise AssertionError(f"requests still queued or running after {PATIENCE_S} s: {values}")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", {"prompt": "x", "max_tokens": 1, "stream": False}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 1}}),
    ],
)
async def test_body_over_max_body_bytes_is_a_413(server, path, body):
    status, _ = await post(server.url, path, body)
    assert status == 200
    padded = json.dumps({**body, "padding": "x" * MAX_BODY_BYTES}).encode()
    status, answer = await post(server.url, path, padded)
    assert status == 413 and error_type(answer) == "payload_too_large"


async def test_chunked_body_over_max_body_bytes_is_a_413(server):
    async def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 512 + 1):
            yield b"x" * 512
        yield b'"}'

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(f"{server.url}/predict", data=chunks()) as response:
            assert response.status == 413
            assert (await response.json())["error_type"] == "payload_too_large"


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by PATIENCE_S)."""
    received = b""
    async with asyncio.timeout(PATIENCE_S):
        while chunk := await reader.read(4096):
            received += chunk
    return received


async def test_a_body_that_never_arrives_is_a_408_and_the_connection_is_closed(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    writer.write(head.encode() + b'{"prompt": ')
    await writer.drain()
    received = await read_until_closed(reader)
    writer.close()
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), received[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error_type"] == "read_timeout"


async def test_headers_sent_a_byte_at_a_time_do_not_hold_the_connection(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 1000
    closed = asyncio.create_task(read_until_closed(reader))
    sent = 0
    # One byte every 100 ms would take 100 s; the server gives up after --read-timeout.
    while not closed.done() and sent < len(head):
        try:
            writer.write(head[sent : sent + 1])
            await writer.drain()
        except ConnectionError:
            break
        sent += 1
        await asyncio.sleep(0.1)
    assert await closed == b"" and sent < len(head)
    writer.close()
    status, answer = await post(server.url, "/predict", {"prompt": "x", "max_tokens": 1, "stream": False})
    assert status == 200 and answer["generated_tokens"] == 1


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/predict", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop must hold at most 2 strings, got 3"),
        ("/generate", {"inputs": "x", "parameters": {"stop": ["a", "b", "c"]}}, "stop must hold at most 2"),
        ("/generate", {"inputs": "x", "parameters": {"top_n_tokens": 3}}, "top_n_tokens must be >= 0 and <= 2"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop must hold at most 2"),
        ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs must be >= 0 and <= 2"),
        ("/v1/completions", {"prompt": ["x", "y"], "n": 2}, "n (2) x prompts (2) must be <= 2"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 3}, "n must be >= 1 and <= 2, got 3"),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 3}, "top_logprobs must be"),
    ],
)
async def test_per_request_limits_are_a_422_naming_the_flag_bound(server, path, body, message):
    status, answer = await post(server.url, path, body)
    assert status == 422 and error_type(answer) == "validation"
    text = answer["error"]["message"] if path.startswith("/v1/") else answer["error"]
    assert message in text


async def test_per_request_limits_themselves_are_accepted_and_published(server):
    body = {"messages": CHAT, "max_tokens": 2, "n": 2, "stop": ["a", "b"], "logprobs": True, "top_logprobs": 2}
    status, answer = await post(server.url, "/v1/chat/completions", body)
    assert status == 200 and len(answer["choices"]) == 2
    assert all(len(token["top_logprobs"]) == 2 for token in answer["choices"][0]["logprobs"]["content"])
    body = {"inputs": "x", "parameters": {"max_new_tokens": 2, "stop": ["a", "b"], "top_n_tokens": 2, "details": True}}
    status, answer = await post(server.url, "/generate", body)
    assert status == 200 and all(len(top) == 2 for top in answer["details"]["top_tokens"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(f"{server.url}/info") as response:
            assert (await response.json())["max_stop_sequences"] == 2
        async with session.get(f"{server.url}/openapi.json") as response:
            schemas = (await response.json())["components"]["schemas"]
    assert schemas["GenerateParameters"]["properties"]["stop"]["maxItems"] == 2
    assert schemas["GenerateParameters"]["properties"]["top_n_tokens"]["maximum"] == 2
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": "x", "parameters": {"temperature": 1e39, "max_new_tokens": 1}}),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 3.5e38, "max_tokens": 1}),
        ("/predict", {"prompt": "x", "top_p": 1e-40, "max_tokens": 1}),
    ],
)
async def test_a_number_the_shards_cannot_take_is_a_422_and_harms_no_one(server, path, body):
    # Found by the fuzzer: finite in the router, inf or 0 as the shards' 32-bit float, and the shards refused
    # the whole step, which failed every request in flight and restarted the shard group.
    status, answer = await post(server.url, path, body)
    assert status == 422 and "32-bit" in json.dumps(answer)
    values = await gauges(server.url)
    assert values["mixserve_shard_failures_total"] == 0


async def open_stream(session: aiohttp.ClientSession, url: str, i: int) -> aiohttp.ClientResponse:
    """A long streaming request on one of the four APIs, once its first bytes have arrived."""
    kind = i % 4
    if kind == 0:
        path, body = "/predict", {"prompt": f"stream {i}", "max_tokens": LONG}
    elif kind == 1:
        path, body = "/v1/chat/completions", {"messages": CHAT, "max_tokens": LONG, "stream": True, "ignore_eos": True}
    elif kind == 2:
        path, body = "/v1/completions", {"prompt": f"stream {i}", "max_tokens": LONG, "stream": True}
        body["ignore_eos"] = True
    else:
        path, body = "/generate_stream", {"inputs": f"stream {i}", "parameters": {"max_new_tokens": LONG}}
    response = await session.post(f"{url}{path}", json=body)
    assert response.status == 200, await response.text()
    assert await response.content.readany()
    return response


async def test_queue_bound_and_a_burst_of_cancelled_streams_frees_every_block(server):
    before = await settled(server.url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        streams = await asyncio.gather(*(open_stream(session, server.url, i) for i in range(MAX_CONCURRENT)))
        during = await gauges(server.url)
        # Every slot is taken: one more is refused at once, in its API's error shape.
        status, answer = await post(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
        assert status == 429 and answer["error"]["type"] == "rate_limit_error"
        assert error_type(answer) == "overloaded"
        status, answer = await post(server.url, "/predict", {"prompt": "x", "max_tokens": 1})
        assert status == 429 and answer["error_type"] == "overloaded" and str(MAX_CONCURRENT) in answer["error"]
        for response in streams:
            response.close()
    after = await settled(server.url)
    assert during["mixserve_kv_blocks_used"] > 0
    assert during["mixserve_queue_size"] + during["mixserve_batch_size"] == MAX_CONCURRENT
    assert after["mixserve_kv_blocks_used"] == 0
    assert after["mixserve_kv_blocks_free"] == after["mixserve_kv_blocks_total"]
    assert after["end_cancelled"] - before["end_cancelled"] == MAX_CONCURRENT
    status, answer = await post(server.url, "/predict", {"prompt": "x", "max_tokens": 1, "stream": False})
    assert status == 200 and answer["generated_tokens"] == 1


@pytest.fixture(scope="module")
def deadline_server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--request-timeout", "1")
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", {"prompt": "x", "max_tokens": LONG, "stream": False}),
        ("/v1/completions", {"prompt": "x", "max_tokens": LONG, "ignore_eos": True}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": LONG}}),
    ],
)
async def test_a_request_past_its_deadline_is_a_504(deadline_server, path, body):
    status, answer = await post(deadline_server.url, path, body)
    assert status == 504 and error_type(answer) == "timeout"
    values = await settled(deadline_server.url)
    assert values["mixserve_kv_blocks_used"] == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": LONG}}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": LONG, "stream": True, "ignore_eos": True}),
    ],
)
async def test_a_stream_past_its_deadline_ends_with_an_error_event(deadline_server, path, body):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(f"{deadline_server.url}{path}", json=body) as response:
            text = await response.text()
    if response.status == 200:
        events = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: {")]
        assert len(events) >= 2 and error_type(events[-1]) == "timeout"
        assert "data: [DONE]" not in text
    else:
        # The deadline passed before the first token: the answer is still the JSON error.
        assert response.status == 504 and error_type(json.loads(text)) == "timeout"
    values = await settled(deadline_server.url)
    assert values["mixserve_kv_blocks_used"] == 0
