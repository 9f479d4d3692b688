"""Speculative decoding through real servers: outputs equal those without speculation (greedy and
seeded sampling; k = 3 on 1 shard with multi-step decode on, k = 5 on 2 tensor-parallel shards that also
look up finished requests' tokens and verify through the decode graphs' static buffers (`--cuda-graphs
eager`: each token a row), k = 1 on 2 expert-parallel shards with multi-step off), stops and
max_new_tokens inside accepted runs, prefix cache hits, cancellation mid-run, and grammar-constrained requests
(which propose the tokens their grammar forces); KV blocks all back at the
end, and the counters show proposals both accepted and rejected; a request repeating an earlier one has
its proposals from that one's tokens where the finished requests' tokens are looked up."""

import json
import re

import aiohttp
import pytest

from json_schemas import SMALL_JSON_SCHEMA as SCHEMA
from launched_server import await_until, servers_side_by_side

pytestmark = pytest.mark.slow

# Prompts that repeat themselves, so n-gram proposals are right part of the time.
PROMPTS = [
    "one two three four one two three four one two three",
    "the cat sat on the mat. the cat sat on the mat. the cat",
    "abc abc abc abc abc",
    "def f(x): return x\ndef g(x): return x\ndef h(x):",
]
SEEDED = {"temperature": 0.8, "top_p": 0.95, "seed": 11, "do_sample": True}
JSON_GRAMMAR = {"type": "json", "value": SCHEMA}


@pytest.fixture(scope="module")
def servers(demo_dir, tmp_path_factory):
    """No speculation (1 shard; constrained requests' neither: --no-speculate-constrained), --speculate 3
    (1 shard, multi-step decode on: speculating runs), --speculate 5 with --speculate-history-tokens
    (2 shards, tensor parallel, speculating runs, verifications through the decode graphs' static
    buffers), --speculate 1 (2 shards, expert parallel, multi-step off: single verification steps):
    started side by side. Only the last weighs speculation's cost (n-gram speculation does not by
    default): the others must speculate whatever it costs on this CPU."""
    flags = ["--model", str(demo_dir), "--max-kv-blocks", "256", "--block-size", "4"]
    flags += ["--max-batch-prefill-tokens", "64"]
    variants = {
        "plain": ["--num-shard", "1", "--no-speculate-constrained"],
        "k3": ["--num-shard", "1", "--speculate", "3", "--max-decode-steps", "8"],
        "k5_tp2": [
            "--num-shard",
            "2",
            "--speculate",
            "5",
            "--max-decode-steps",
            "4",
            "--speculate-history-tokens",
            "2048",
            "--cuda-graphs",
            "eager",
        ],
        "k1_ep2": [
            *("--num-shard", "2", "--moe-parallel", "ep", "--speculate", "1", "--max-decode-steps", "1"),
            "--speculate-cost-back-off",
        ],
    }
    yield from servers_side_by_side(tmp_path_factory, flags, variants)


async def generate(session: aiohttp.ClientSession, url: str, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True, **parameters}}
    async with session.post(f"{url}/generate", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def info(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/info") as response:
        return await response.json()


def text_and_end(answer: dict) -> tuple[str, str, list[int]]:
    details = answer["details"]
    return answer["generated_text"], details["finish_reason"], [t["id"] for t in details["tokens"]]


async def workload(url: str, stops: dict[str, str]) -> list[tuple]:
    """Greedy and seeded prompts, short max_new_tokens, stop strings, and each prompt again (a prefix hit)."""
    async with aiohttp.ClientSession() as session:
        answers = []
        for prompt in PROMPTS:
            answers.append(await generate(session, url, prompt))
            answers.append(await generate(session, url, prompt, **SEEDED))
            for n in (2, 5):
                answers.append(await generate(session, url, prompt, max_new_tokens=n))
            if prompt in stops:
                answers.append(await generate(session, url, prompt, stop=[stops[prompt]]))
            answers.append(await generate(session, url, prompt))  # the prompt's blocks are cached now
        return [text_and_end(a) for a in answers], answers


async def cancel_mid_run(url: str) -> None:
    """Read three streamed tokens, then leave; the server ends the request and frees its blocks."""
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 200}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/generate_stream", json=body) as response:
            events = 0
            async for line in response.content:
                events += line.startswith(b"data:")
                if events == 3:
                    break

        async def freed() -> bool:
            return not (await info(session, url))["kv_blocks_used"]

        await await_until(freed, "the left request's blocks freed", 30)
        state = await info(session, url)
        assert state["kv_blocks_used"] == 0 and state["requests_running"] == 0


async def plain_stops_and_outputs(plain: str) -> tuple[dict[str, str], list]:
    """Stop strings from a plain server's output, a few tokens in (they land wherever a speculating run puts
    them), and the plain server's answers to the workload with them."""
    async with aiohttp.ClientSession() as session:
        firsts = [await generate(session, plain, p) for p in PROMPTS]
    stops = {p: a["generated_text"][6:9] for p, a in zip(PROMPTS, firsts, strict=True) if len(a["generated_text"]) > 9}
    assert stops
    expected, _ = await workload(plain, stops)
    return stops, expected


async def test_speculative_outputs_equal_plain_outputs(servers):
    plain = servers["plain"].url
    stops, expected = await plain_stops_and_outputs(plain)
    async with aiohttp.ClientSession() as session:
        expected_constrained = text_and_end(
            await generate(session, plain, PROMPTS[2], grammar=JSON_GRAMMAR, max_new_tokens=48)
        )
    assert json.loads(expected_constrained[0]).keys() == {"name", "n", "ok"}
    for name in ("k3", "k5_tp2", "k1_ep2"):
        url = servers[name].url
        got, answers = await workload(url, stops)
        assert got == expected, name
        assert any(a["details"]["finish_reason"] == "stop_sequence" for a in answers)
        proposed = sum(a["details"]["speculative_proposed"] for a in answers)
        accepted = sum(a["details"]["speculative_accepted"] for a in answers)
        assert 0 < accepted < proposed, (name, accepted, proposed)
        async with aiohttp.ClientSession() as session:
            # A grammar-constrained request proposes what its grammar forces (the keys and punctuation), and
            # its rows are masked as the grammar stands after the proposals before them: the plain tokens.
            constrained = await generate(session, url, PROMPTS[2], grammar=JSON_GRAMMAR, max_new_tokens=48)
        assert text_and_end(constrained) == expected_constrained, name
        details = constrained["details"]
        if name != "k1_ep2":  # (which weighs the cost of speculating, and may pause it)
            assert 0 < details["speculative_accepted"] <= details["speculative_proposed"], (name, details)
        await cancel_mid_run(url)
        async with aiohttp.ClientSession() as session:
            state = await info(session, url)
            async with session.get(f"{url}/metrics") as response:
                metrics = await response.text()
        assert state["kv_blocks_used"] == 0
        # Both happened: proposals accepted, and proposals rejected (their blocks given back).
        assert 0 < state["speculative_accepted_tokens"] < state["speculative_proposed_tokens"]
        counted = {
            m.group(1): float(m.group(2))
            for m in re.finditer(r"^mixserve_speculative_(\w+)_tokens_total (\S+)$", metrics, re.MULTILINE)
        }
        assert counted == {
            "proposed": state["speculative_proposed_tokens"],
            "accepted": state["speculative_accepted_tokens"],
        }
        finished = servers[name].contract_log("the per-request event=finished line carries the speculation counts")
        assert re.search(r"event=finished .* speculative_proposed=\d+ speculative_accepted=\d+", finished)
        (group,) = state["shard_groups"]
        if name == "k1_ep2":
            # The cost back-off timed both kinds of step at one request, the workload's batch.
            assert any(e["batch"] == 1 and e["plain"] and e["speculating"] for e in group["speculation_step_us"])
        else:
            assert group["speculation_step_us"] == []
    async with aiohttp.ClientSession() as session:
        plain_info = await info(session, plain)
    assert plain_info["speculate"] == 0 and plain_info["speculative_proposed_tokens"] == 0


async def test_a_repeated_request_proposes_from_the_finished_one_where_history_is_looked_up(servers):
    """A prompt that does not repeat itself, sent twice: looking up only its own tokens, the second request
    proposes and keeps what the first did; with the finished requests' tokens looked up too, it proposes
    the first one's output, which greedy decoding repeats, where its own tokens hold no match, and keeps more."""
    prompt = "zebra quantum violet lantern harbor 17 copper whistle"
    kept = {}
    async with aiohttp.ClientSession() as session:
        for name in ("k3", "k5_tp2"):
            url = servers[name].url
            answers = [await generate(session, url, prompt) for _ in range(2)]
            assert text_and_end(answers[0]) == text_and_end(answers[1])
            kept[name] = [(a["details"]["speculative_proposed"], a["details"]["speculative_accepted"]) for a in answers]
            assert (await info(session, url))["speculate_history_tokens"] == (2048 if name == "k5_tp2" else 0)
    assert kept["k3"][0] == kept["k3"][1]
    (_, first_accepted), (_, accepted) = kept["k5_tp2"]
    assert accepted >= first_accepted + 3, kept  # 17 (of 17 proposed) against 9 when written


async def completion(session: aiohttp.ClientSession, url: str, body: dict) -> str:
    async with session.post(f"{url}/v1/completions", json={"max_tokens": 24, "temperature": 0, **body}) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["choices"][0]["text"]


async def restricted_texts(url: str, free: list[str]) -> list[str]:
    """Each prompt's greedy text with only its own tokens allowed, then with its free text's first words banned."""
    async with aiohttp.ClientSession() as session:
        texts = []
        for prompt, text in zip(PROMPTS, free, strict=True):
            async with session.post(f"{url}/tokenize", json={"prompt": prompt}) as response:
                own = (await response.json())["tokens"]
            texts.append(await completion(session, url, {"prompt": prompt, "allowed_token_ids": own}))
            texts.append(await completion(session, url, {"prompt": prompt, "bad_words": text.split()[:2]}))
        return texts


async def test_allowed_tokens_and_bad_words_keep_the_plain_servers_tokens(servers):
    """vLLM's allowed_token_ids and bad_words while speculating: every server gives the plain one's text, which
    the restrictions change; verification steps ran for them (proposals made while they ran)."""
    plain = servers["plain"].url
    async with aiohttp.ClientSession() as session:
        free = [await completion(session, plain, {"prompt": prompt}) for prompt in PROMPTS]
    expected = await restricted_texts(plain, free)
    assert any(t != f for t, f in zip(expected[::2], free, strict=True))
    assert any(t != f for t, f in zip(expected[1::2], free, strict=True))
    for name in ("k3", "k5_tp2", "k1_ep2"):
        url = servers[name].url
        async with aiohttp.ClientSession() as session:
            before = (await info(session, url))["speculative_proposed_tokens"]
            assert await restricted_texts(url, free) == expected, name
            state = await info(session, url)
        assert state["speculative_proposed_tokens"] > before and state["kv_blocks_used"] == 0, name
