"""Security defaults of a real `mixserve launch` (1 shard): the API key is compared in constant time and never
logged, prompts and generated text stay out of the log unless --log-prompts, the router listens on loopback
unless told otherwise, and the shards' unix sockets are owner-only (0600 in 0700 directories)."""

import argparse
import hmac
import os
import re
import stat
import tempfile
from pathlib import Path

import aiohttp
import pytest
from transformers import AutoTokenizer

from app_without_shards import client_without_shards
from mixserve.router import launcher
from mixserve.router.front_config import api_key_matches
from mixserve.router.server import ServerConfig

API_KEY = "key-7Hq2-canary"
PROMPT = "quokka lantern canary"
CHAT = [{"role": "user", "content": "ferret harbor canary"}]
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--api-key", API_KEY, "--cors-allow-origin", ORIGIN)
    yield server
    server.stop()  # free the CPU for the modules after this one


@pytest.fixture(scope="module")
def logging_server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--api-key", API_KEY, "--log-prompts")
    yield server
    server.stop()


async def generate(url: str, authorization: str) -> list[tuple[int, str]]:
    """The same prompts through /predict, the OpenAI chat route and TGI's /generate: (status, generated text)."""
    calls = [
        ("/predict", {"prompt": PROMPT, "max_tokens": 16, "stream": False}, lambda a: a["output"]),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 16}, lambda a: a["choices"][0]["message"]["content"]),
        ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 16}}, lambda a: a["generated_text"]),
    ]
    answers = []
    async with aiohttp.ClientSession(headers={"Authorization": authorization}) as session:
        for path, body, text in calls:
            async with session.post(f"{url}{path}", json=body) as response:
                answer = await response.json()
                answers.append((response.status, text(answer) if response.status == 200 else answer["error_type"]))
    return answers


@pytest.mark.slow
async def test_api_key_is_required_and_never_logged(server):
    """The log is the contract here: a refusal is one access line with its status, and no form of the key
    ever reaches the log."""
    wrong = [f"Bearer {API_KEY[:-1]}", f"Bearer {API_KEY}x", f"Basic {API_KEY}", "Bearer ", API_KEY]
    for authorization in wrong:
        assert {status for status, _ in await generate(server.url, authorization)} == {401}
    for authorization in (f"Bearer {API_KEY}", f"Api-Key {API_KEY}"):
        assert {status for status, _ in await generate(server.url, authorization)} == {200}
    log = server.contract_log("the refusal's access line, and no key in the log")
    assert "event=refused" in log and "status=401" in log
    assert API_KEY not in log and API_KEY[:-1] not in log


@pytest.mark.slow
async def test_a_browser_page_of_an_allowed_origin_streams_with_the_key(server):
    """--cors-allow-origin: the preflight passes without the key, the streamed answer carries the allow header
    from its first byte, and the request itself still needs the key."""
    url = f"{server.url}/v1/chat/completions"
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    body = {"messages": CHAT, "max_tokens": 8, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.options(url, headers=preflight) as response:
            assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == ORIGIN
        async with session.post(url, json=body, headers={"Origin": ORIGIN}) as response:
            assert response.status == 401 and response.headers["Access-Control-Allow-Origin"] == ORIGIN
        headers = {"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"}
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
            events = [line async for line in response.content if line.startswith(b"data: ")]
        assert events[-1].strip() == b"data: [DONE]" and len(events) >= 3


@pytest.mark.slow
async def test_prompts_and_generated_text_are_not_logged_by_default(server):
    """The log is the contract: requests are logged (`event=finished`) without their text."""
    answers = await generate(server.url, f"Bearer {API_KEY}")
    assert [status for status, _ in answers] == [200, 200, 200]
    log = server.contract_log("no prompt or generated text in the log by default")
    assert "event=finished" in log
    for secret in ("quokka", "ferret", *(text.strip() for _, text in answers if len(text.strip()) >= 8)):
        assert secret not in log


@pytest.mark.slow
async def test_log_prompts_logs_them_and_still_not_the_key(logging_server):
    """The log is the contract: --log-prompts logs each prompt and output (documented lines), never the key."""
    answers = await generate(logging_server.url, f"Bearer {API_KEY}")
    assert [status for status, _ in answers] == [200, 200, 200]
    log = logging_server.contract_log("--log-prompts' event=prompt and event=output lines, and no key")
    prompts = re.findall(r"event=prompt id=\S+ text=(.*)", log)
    assert any(PROMPT in line for line in prompts) and any("ferret harbor canary" in line for line in prompts)
    assert len(re.findall(r"event=output id=\S+ finish=\w+ text=", log)) >= 3
    assert API_KEY not in log


@pytest.mark.slow
def test_router_listens_on_loopback_by_default(server):
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"
    # The launched server was given no --host: its listening socket is bound to 127.0.0.1, not to every address.
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) == server.port:
                listening.append(address)
    if not listening:
        pytest.skip("no /proc/net/tcp here to read listening sockets from")
    assert listening == ["0100007F"]


@pytest.mark.slow
def test_shard_sockets_are_owner_only(server):
    paths = [shard.uds for shard in server.shards()]
    assert paths, "the launcher runs no shard on a unix socket"
    temp_root = Path(tempfile.gettempdir()).resolve()
    for path in paths:
        info = path.stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
        directory = path.resolve().parent
        assert temp_root in directory.parents, f"{path} is not under the temp dir"
        while directory != temp_root:
            info = directory.stat()
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid(), f"{directory} is not 0700"
            directory = directory.parent


def test_api_key_comparison_is_of_equal_length_digests(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert api_key_matches(f"Bearer {API_KEY}", API_KEY) and api_key_matches(f"api-key  {API_KEY} ", API_KEY)
    for sent in ("Bearer x", f"Bearer {API_KEY * 40}", f"Bearer {API_KEY[:-1]}", f"Token {API_KEY}", "", "\udcff"):
        assert not api_key_matches(sent, API_KEY)
    # Every comparison went through hmac.compare_digest, on inputs whose length does not depend on what was sent.
    assert len(compared) == 8 and {(len(a), len(b)) for a, b in compared} == {(32, 32)}


@pytest.fixture
async def app_client(demo_dir, tmp_path):
    """The app as `mixserve launch` builds it, with an API key; these routes never reach the (absent) shards."""
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    async with client_without_shards(tokenizer, tmp_path, ServerConfig(model_id="demo", api_key=API_KEY)) as client:
        yield client


async def test_http_refuses_any_other_key(app_client):
    for authorization in (f"Bearer {API_KEY}", f"Api-Key {API_KEY}"):
        assert (await app_client.get("/info", headers={"Authorization": authorization})).status == 200
    for authorization in ("Bearer", f"Bearer {API_KEY.upper()}", f"Bearer\t{API_KEY}", "Bearer \u00e9"):
        response = await app_client.get("/info", headers={"Authorization": authorization})
        assert response.status == 401 and (await response.json())["error_type"] == "authentication"


async def test_only_the_probes_answer_without_the_key(app_client):
    """/health and SageMaker's /ping answer without a key (503 here: the group has no shard); nothing else does."""
    for path in ("/health", "/ping"):
        response = await app_client.get(path)
        assert response.status == 503 and (await response.json())["status"] == "unavailable"
    for method, path in (("GET", "/version"), ("GET", "/info"), ("GET", "/metrics"), ("POST", "/invocations")):
        assert (await app_client.request(method, path, json={"inputs": "x"})).status == 401, path
