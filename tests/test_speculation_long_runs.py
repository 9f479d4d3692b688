"""Speculation's long accepted runs, through real servers: on a checkpoint that copies its prompt (`bench
copy-circuit`), prompt lookup at K = 16 keeps nearly every proposal, so max_new_tokens cuts runs of up
to 16 tokens short, and stop strings and a cancellation land deep inside them (the other speculation
tests' demo keeps runs of a few). Outputs, greedy and seeded, equal a plain server's, and every KV block
comes back."""

import random
import re

import aiohttp
import pytest
from test_speculative_serving import SEEDED, cancel_mid_run, generate, info, text_and_end
from tokenizers import Tokenizer

from launched_server import servers_side_by_side
from mixserve.benchmarks.workload import DEMO_CORPUS, copy_prompt

pytestmark = pytest.mark.slow

K = 16


@pytest.fixture(scope="module")
def servers(copier_dir, tmp_path_factory):
    """Plain decoding on 1 shard; --speculate 16 on 2 tensor-parallel shards in multi-step runs of 8."""
    flags = ["--model", str(copier_dir), "--max-kv-blocks", "512", "--block-size", "4"]
    variants = {
        "plain": ["--num-shard", "1"],
        "k16": ["--num-shard", "2", "--speculate", str(K), "--max-decode-steps", "8"],
    }
    yield from servers_side_by_side(tmp_path_factory, flags, variants)


def copy_prompts(copier, count: int) -> list[str]:
    """Corpus passages, a line break and each passage's start again: the copier continues the passage."""
    tokenizer = Tokenizer.from_file(str(copier / "tokenizer.json"))
    corpus = DEMO_CORPUS.read_text(encoding="utf-8")
    rng = random.Random(0)
    return [copy_prompt(tokenizer, corpus, 72, rng) for _ in range(count)]


async def test_runs_of_sixteen_keep_the_plain_outputs_and_stop_inside_them(servers, copier_dir):
    plain, spec = servers["plain"].url, servers["k16"].url
    async with aiohttp.ClientSession() as session:
        stopped = 0
        for prompt in copy_prompts(copier_dir, 3):
            expected = await generate(session, plain, prompt, max_new_tokens=48)
            got = await generate(session, spec, prompt, max_new_tokens=48)
            assert text_and_end(got) == text_and_end(expected)
            assert got["details"]["speculative_accepted"] >= 40, got["details"]
            # Sampled and seeded: the rejection rule over runs of 16 keeps the plain server's draws.
            wanted = text_and_end(await generate(session, plain, prompt, max_new_tokens=48, **SEEDED))
            assert text_and_end(await generate(session, spec, prompt, max_new_tokens=48, **SEEDED)) == wanted
            # Limits a run of 16 would pass: the run is cut to what each leaves.
            for limit in (3, 11, 21):
                wanted = text_and_end(await generate(session, plain, prompt, max_new_tokens=limit))
                assert text_and_end(await generate(session, spec, prompt, max_new_tokens=limit)) == wanted
            stop = expected["generated_text"][60:66]
            if stop.strip():
                wanted = text_and_end(await generate(session, plain, prompt, stop=[stop]))
                answer = await generate(session, spec, prompt, stop=[stop])
                assert text_and_end(answer) == wanted
                stopped += answer["details"]["finish_reason"] == "stop_sequence"
        assert stopped
        async with session.get(f"{spec}/metrics") as response:
            metrics = await response.text()
    kept = {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(
            r'^mixserve_speculative_accepted_by_position_total\{position="(\d+)"\} (\S+)$', metrics, re.M
        )
    }
    # Whole runs of 16 were kept: every proposal of a verification, the last one too.
    assert kept.get(K - 1, 0) > 0, kept
    await cancel_mid_run(spec)
    async with aiohttp.ClientSession() as session:
        state = await info(session, spec)
    assert state["kv_blocks_used"] == 0 and state["requests_running"] == 0
    assert state["speculative_accepted_tokens"] > 0.8 * state["speculative_proposed_tokens"]
