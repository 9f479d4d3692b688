"""Seeded random bodies against every POST route of a real `mixserve launch` (1 shard): valid requests of
each API with one to three fields replaced by values of the wrong type, out of range, empty, huge, nested
or not valid text, removed, or repeated. Every answer is a success or a refusal with its JSON error body
(400, 413, 422), never a 5xx; the server counts no 5xx in /metrics, holds no request or KV block after,
and still answers. This is how lone UTF-16 surrogates and deep nesting were found to be 500s."""

import asyncio
import copy
import json
import random

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

ROUNDS = 400  # requests, each a seeded mutation of a base body below
# A body whose length field was removed runs to this many tokens in all, not to the model's context.
MAX_TOTAL_TOKENS = 96
CONCURRENCY = 6
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
JSON_SCHEMA = {"name": "x", "schema": SCHEMA}
BASES = {
    "/v1/chat/completions": [
        {"messages": MESSAGES, "max_tokens": 4},
        {"messages": MESSAGES, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
        {"messages": MESSAGES, "max_tokens": 4, "tools": TOOLS, "tool_choice": "auto"},
        {
            "messages": MESSAGES,
            "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
        },
        {
            "messages": MESSAGES,
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 2,
            "n": 2,
            "seed": 3,
            "temperature": 0.7,
        },
        {"messages": MESSAGES, "max_tokens": 4, "prediction": {"type": "content", "content": "the Nile"}},
    ],
    "/v1/completions": [
        {"prompt": "The ", "max_tokens": 4, "stop": ["a"], "logit_bias": {"5": 10}},
        {"prompt": [1, 2, 3], "max_tokens": 4, "echo": True, "logprobs": 2},
        {"prompt": ["a", "b"], "max_tokens": 4, "stream": True, "guided_choice": ["yes", "no"]},
        {"prompt": "x", "max_tokens": 4, "guided_regex": "[a-z]+", "bad_words": ["the"], "min_p": 0.1, "top_k": 5},
    ],
    "/v1/responses": [
        {"input": "Hi", "max_output_tokens": 4},
        {"input": [{"role": "user", "content": "Hi"}], "max_output_tokens": 4, "stream": True},
    ],
    "/generate": [
        {"inputs": "The ", "parameters": {"max_new_tokens": 4, "details": True, "top_n_tokens": 2, "seed": 1}},
        {"inputs": "The ", "parameters": {"max_new_tokens": 4, "grammar": {"type": "json", "value": SCHEMA}}},
    ],
    "/generate_stream": [{"inputs": "The ", "parameters": {"max_new_tokens": 4, "do_sample": True, "top_p": 0.9}}],
    "/predict": [{"prompt": "The ", "max_tokens": 4}, {"messages": MESSAGES, "stream": False, "temperature": 0}],
    "/tokenize": [{"prompt": "hello"}, {"messages": MESSAGES, "return_token_strs": True}],
    "/detokenize": [{"tokens": [1, 2, 3]}],
    "/chat_tokenize": [{"messages": MESSAGES, "tools": TOOLS}],
    "/invocations": [
        {"messages": MESSAGES, "max_tokens": 4},
        {"prompt": "The ", "max_tokens": 4},
        {"inputs": "The ", "parameters": {"max_new_tokens": 4}, "stream": True},
    ],
}
DEEP: list = []
for _ in range(300):
    DEEP = [DEEP]
ODD_VALUES = [
    None, True, 0, -1, 2**31, 2**64, -(2**63), 10**30, 0.5, -0.5, 1e308, "", "x", "a" * 3000, "\u0000", "\ud800",
    "\udc00x", [], [None], [1, "a"], [[]], {}, {"type": None}, [{"role": "user"}], "[a-", "{", DEEP, [-1], [10**12],
]  # fmt: skip
FIELDS = [
    "max_tokens",
    "n",
    "logprobs",
    "stream",
    "seed",
    "temperature",
    "stop",
    "tools",
    "messages",
    "content",
    "type",
]


def mutate(body: dict, rng: random.Random) -> object:
    """`body` with one to three changes at random places: a value replaced, a key removed or added, a
    string or list repeated."""
    body = copy.deepcopy(body)
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = list(_paths(body))
        path = rng.choice(paths)
        if not path:
            continue
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        roll = rng.random()
        if roll < 0.6:
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif roll < 0.75 and isinstance(parent, dict):
            del parent[path[-1]]
        elif roll < 0.85 and isinstance(parent, dict):
            parent[rng.choice(FIELDS)] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif isinstance(parent[path[-1]], (str, list)):
            parent[path[-1]] = parent[path[-1]] * rng.choice([2, 40])
    return body


def _paths(node: object, prefix: tuple = ()):
    """Every place in `node` down to 8 levels (not into DEEP)."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items if len(prefix) < 8 else ():
        yield from _paths(child, (*prefix, key))


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--max-total-tokens", str(MAX_TOTAL_TOKENS))
    yield server
    server.stop()


async def fuzz(url: str, seed: int) -> tuple[list[str], int]:
    """Send ROUNDS mutated bodies; the problems seen, one line each, and how many were answered 200."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(ROUNDS):
        route = rng.choice(list(BASES))
        bodies.append((route, mutate(rng.choice(BASES[route]), rng)))
    problems: list[str] = []
    answered = 0
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(session: aiohttp.ClientSession, route: str, body: object) -> None:
        data = json.dumps(body)
        async with gate, session.post(f"{url}{route}", data=data) as response:
            text = await response.text()
        if response.status == 200:
            nonlocal answered
            answered += 1
            if '"error_type"' in text:  # an error event in a stream
                problems.append(f"{route} 200 with an error: {text[-200:]} for {data[:300]}")
            return
        try:
            error = json.loads(text)
            shaped = response.status in (400, 413, 422) and "error_type" in error
        except json.JSONDecodeError:
            shaped = False
        if not shaped:
            problems.append(f"{route} {response.status} {text[:200]} for {data[:300]}")

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, route, body) for route, body in bodies))
    return problems, answered


async def server_errors(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mixserve_requests_total" and sample.labels.get("status", "").startswith("5")
    )


async def idle(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            async with session.get(f"{url}/info") as response:
                info = await response.json()
            if info["requests_running"] == 0 and info["requests_waiting"] == 0 and info["kv_blocks_used"] == 0:
                break
            await asyncio.sleep(0.1)
    return info


def test_random_bodies_get_answers_or_json_refusals(server):
    problems, answered = asyncio.run(fuzz(server.url, seed=0))
    assert not problems, "\n".join(problems[:10])
    assert answered >= ROUNDS // 5, f"only {answered} of {ROUNDS} bodies were served: the mutations stop at the door"
    assert asyncio.run(server_errors(server.url)) == 0
    info = asyncio.run(idle(server.url))
    assert (info["requests_running"], info["requests_waiting"], info["kv_blocks_used"]) == (0, 0, 0)


def test_the_mutations_reach_past_validation():
    """The seeds' bodies are not all refused at the door: many are still valid requests, and the odd
    values include those that were 500s."""
    rng = random.Random(0)
    bodies = [json.dumps(mutate(rng.choice(BASES[route]), rng)) for route in list(BASES) * 40]
    assert sum("\\ud800" in b or "\\udc00" in b for b in bodies) >= 5
    assert sum("[[[[[[[[[[" in b for b in bodies) >= 5
    untouched_fields = sum(b.count('"max_tokens": 4') + b.count('"max_new_tokens": 4') for b in bodies)
    assert untouched_fields >= 100
