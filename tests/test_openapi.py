"""`/openapi.json` and `/docs` of the real app (`build_app`), served in-process: no route is left out."""

import re

import pytest
from openapi_spec_validator import validate
from transformers import AutoTokenizer

from app_without_shards import client_without_shards
from mixserve.router.openapi import build_spec, routes
from mixserve.router.server import ServerConfig


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture
async def client(tokenizer, tmp_path):
    """The app as `mixserve launch` builds it; these routes never reach the (absent) shards."""
    async with client_without_shards(
        tokenizer, tmp_path, ServerConfig(model_id="/models/mixtral-demo", version="1.2.3")
    ) as client:
        yield client


async def test_every_route_is_in_the_spec(client):
    response = await client.get("/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    spec = await response.json()
    served = routes(client.app)
    assert ("POST", "/v1/chat/completions") in served and ("GET", "/metrics") in served
    for method, path in served:
        assert method.lower() in spec["paths"].get(path, {}), f"{method} {path} is missing from /openapi.json"
    listed = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert listed == set(served)
    # HEAD is answered for every GET, and only GETs.
    heads = {r.resource.canonical for r in client.app.router.routes() if r.method == "HEAD"}
    assert heads == {p for m, p in served if m == "GET"}


async def test_spec_is_valid_openapi_31_with_bodies_and_bounds(client):
    spec = build_spec(client.app)
    validate(spec)  # OpenAPI 3.1 schema, and every $ref resolves
    assert spec["openapi"] == "3.1.0" and spec["info"]["version"] == "1.2.3"
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            assert op["responses"], f"{method} {path} has no responses"
            if method == "post":
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    schemas = spec["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["temperature"] == {**chat["temperature"], "default": 1.0, "minimum": 0, "maximum": 2.0}
    # OpenAI allows 20 alternatives; --max-top-n-tokens (TGI's default 5) bounds them here.
    assert chat["top_logprobs"]["maximum"] == 5 and schemas["ChatCompletionRequest"]["required"] == ["messages"]
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["default"] == 16
    assert schemas["GenerateParameters"]["properties"]["max_new_tokens"]["default"] == 100
    assert schemas["PredictRequest"]["properties"]["top_k"]["default"] == 50
    assert "text/event-stream" in spec["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]


async def test_docs_page_lists_every_route_and_loads_nothing(client):
    response = await client.get("/docs")
    assert response.status == 200 and response.content_type == "text/html"
    page = await response.text()
    for method, path in routes(client.app):
        assert f"<code>{method} {path}</code>" in page
    assert "temperature" in page and "max_new_tokens" in page
    assert not re.search(r"""(src|href)=["']?https?:""", page), "the docs page must not load anything from outside"


async def test_version_is_the_specs(client):
    """vLLM's /version: the version the spec's info carries."""
    response = await client.get("/version")
    assert response.status == 200 and await response.json() == {"version": "1.2.3"}
