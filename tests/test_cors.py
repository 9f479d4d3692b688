"""`--cors-allow-origin` (router/cors.py): browsers' preflights answered before the key check, the allow header
on every answer to an allowed origin and on none other. The app as `mixserve launch` builds it, in-process;
tests/test_security.py checks a streamed answer and the key through a launched server."""

import argparse

import pytest
from transformers import AutoTokenizer

from app_without_shards import client_without_shards
from mixserve.router import launch_args
from mixserve.router.launch_args import check_origin
from mixserve.router.server import ServerConfig

KEY = "cors-test-key"
APP = "https://app.example"
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST"}


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def test_origins_are_taken_as_browsers_send_them():
    for origin in ("*", APP, "http://localhost:5173", "http://127.0.0.1:8080", "tauri://localhost"):
        assert check_origin(origin) == origin
    with pytest.raises(argparse.ArgumentTypeError, match="without the trailing slash: 'https://app.example'"):
        check_origin(APP + "/")
    for value in ("app.example", "https://app.example/chat", "https://user@app.example", "https://a.example?x=1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="is not an origin"):
            check_origin(value)


def test_the_flag_takes_origins_repeated_or_listed_and_refuses_others(capsys):
    parser = argparse.ArgumentParser()
    launch_args.add_arguments(parser)
    args = parser.parse_args(["--cors-allow-origin", APP, "http://localhost:5173", "--cors-allow-origin", "*"])
    assert args.cors_allow_origin == [APP, "http://localhost:5173", "*"]
    assert parser.parse_args([]).cors_allow_origin == []
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--cors-allow-origin", APP + "/"])
    assert stopped.value.code == 2 and "without the trailing slash" in capsys.readouterr().err


async def test_an_allowed_origin_is_answered_and_others_are_not(tokenizer, tmp_path):
    config = ServerConfig(model_id="demo", api_key=KEY, cors_allow_origins=(APP, "http://localhost:5173"))
    async with client_without_shards(tokenizer, tmp_path, config) as client:
        # A preflight carries no key: answered before the key check, with what the request may send.
        asked = {**PREFLIGHT, "Access-Control-Request-Headers": "authorization, x-stainless-os"}
        response = await client.options("/v1/chat/completions", headers=asked)
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == APP and response.headers["Vary"] == "Origin"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["Access-Control-Allow-Headers"] == "authorization, x-stainless-os"
        assert int(response.headers["Access-Control-Max-Age"]) > 0

        response = await client.options(
            "/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://other.example"}
        )
        assert response.status == 403
        body = await response.json()
        assert body["error_type"] == "forbidden" and "https://other.example" in body["error"]
        assert "Access-Control-Allow-Origin" not in response.headers

        # The request itself still needs the key; its page may read the answer either way, errors included.
        for headers, status in (({"Origin": APP}, 401), ({"Origin": APP, "Authorization": f"Bearer {KEY}"}, 200)):
            response = await client.get("/info", headers=headers)
            assert response.status == status and response.headers["Access-Control-Allow-Origin"] == APP
            assert response.headers["Access-Control-Expose-Headers"] == "Retry-After, X-Request-Id"
        response = await client.post(
            "/tokenize", json={"prompt": "hello"}, headers={"Origin": "http://localhost:5173", "Api-Key": "x"}
        )
        assert response.status == 401 and response.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"

        # Another origin, or none (a server-side client): no header, and the answer as before; a cache keys
        # on the origin either way where there was one.
        for headers, vary in (({"Origin": "https://other.example"}, "Origin"), ({}, None)):
            response = await client.get("/info", headers={**headers, "Authorization": f"Bearer {KEY}"})
            assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
            assert response.headers.get("Vary") == vary
        # OPTIONS that is no preflight goes the way of any request: the key first.
        assert (await client.options("/v1/chat/completions", headers={"Origin": APP})).status == 401


async def test_any_origin_and_no_origin(tokenizer, tmp_path):
    any_origin = ServerConfig(model_id="demo", cors_allow_origins=("*",))
    async with client_without_shards(tokenizer, tmp_path, any_origin) as c:
        response = await c.options("/generate", headers={**PREFLIGHT, "Origin": "https://anything.example"})
        assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Vary" not in response.headers
        response = await c.post("/tokenize", json={"inputs": "hi"}, headers={"Origin": "https://anything.example"})
        assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == "*"
    # Without the flag nothing changes: a preflight is an OPTIONS the routes do not take.
    async with client_without_shards(tokenizer, tmp_path, ServerConfig(model_id="demo")) as c:
        response = await c.options("/v1/chat/completions", headers=PREFLIGHT)
        assert response.status == 405 and "Access-Control-Allow-Origin" not in response.headers
        response = await c.get("/info", headers={"Origin": APP})
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
