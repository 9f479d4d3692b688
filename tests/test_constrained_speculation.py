"""Grammar-constrained requests speculate on a server without --speculate (`--speculate-constrained`, the
default): a JSON-schema completion and a forced tool call propose the tokens their grammar forces, keep
most of them, and answer what a server with `--no-speculate-constrained` answers (greedy and seeded);
free requests still propose nothing there; KV blocks all back at the end; /info says the setting."""

import json

import aiohttp
import pytest

from json_schemas import SMALL_JSON_SCHEMA
from launched_server import servers_side_by_side

pytestmark = pytest.mark.slow

RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "r", "schema": SMALL_JSON_SCHEMA}}
TOOL = {"type": "function", "function": {"name": "record", "parameters": SMALL_JSON_SCHEMA}}
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 11}


@pytest.fixture(scope="module")
def servers(demo_dir, tmp_path_factory):
    """`default`: 1 shard, no --speculate; `off`: the same with --no-speculate-constrained."""
    flags = ["--model", str(demo_dir), "--num-shard", "1", "--max-kv-blocks", "256", "--block-size", "4"]
    variants = {"default": [], "off": ["--no-speculate-constrained"]}
    yield from servers_side_by_side(tmp_path_factory, flags, variants)


async def info(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/info") as response:
        return await response.json()


async def post(session: aiohttp.ClientSession, url: str, path: str, body: dict) -> dict:
    async with session.post(f"{url}{path}", json={"model": "m", **body}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_constrained_requests_speculate_by_default_and_answer_the_same(servers):
    completion = {"prompt": "Give the record:", "max_tokens": 48, "response_format": RESPONSE_FORMAT}
    chat = {
        "messages": [{"role": "user", "content": "Record it."}],
        "max_tokens": 64,
        "tools": [TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    async with aiohttp.ClientSession() as session:
        answers: dict[str, list] = {}
        for name, server in servers.items():
            before = await info(session, server.url)
            assert before["speculate"] == 0 and before["speculate_constrained"] == (name == "default")
            answers[name] = []
            for sampling in ({"temperature": 0}, SEEDED):
                text = (await post(session, server.url, "/v1/completions", {**completion, **sampling}))["choices"]
                assert json.loads(text[0]["text"]).keys() == {"name", "n", "ok"}, name
                message = (await post(session, server.url, "/v1/chat/completions", {**chat, **sampling}))["choices"]
                [call] = message[0]["message"]["tool_calls"]
                assert json.loads(call["function"]["arguments"]).keys() == {"name", "n", "ok"}, name
                answers[name] += [text[0]["text"], call["function"]["arguments"]]
            constrained = await info(session, server.url)
            # A free request proposes nothing on either server.
            free = {"prompt": "the cat", "max_tokens": 16, "temperature": 0}
            await post(session, server.url, "/v1/completions", free)
            after = await info(session, server.url)
            assert after["speculative_proposed_tokens"] == constrained["speculative_proposed_tokens"], name
            assert after["kv_blocks_used"] == 0, name
            proposed = constrained["speculative_proposed_tokens"] - before["speculative_proposed_tokens"]
            kept = constrained["speculative_accepted_tokens"] - before["speculative_accepted_tokens"]
            if name == "off":
                assert proposed == 0
            else:  # the schema's keys, quotes and separators, mostly kept
                assert kept > 0 and kept >= proposed // 2, (kept, proposed)
        assert answers["default"] == answers["off"]
