"""Draft-model speculation through real servers (`--speculative-model`): outputs equal those without
speculation (greedy and seeded; k = 3 on 2 tensor-parallel shards with the model as its own draft, k = 1
on 1 shard with a smaller draft), stops and max_new_tokens inside accepted runs, prefix hits and
cancellation mid-run; KV blocks all back at the end. The demo's random weights give flat logits, so a
draft is unsure of every token and makes one proposal a step of those reserved: the reserved slots it
leaves unused roll back like rejected ones (multi-token drafts: tests/test_draft_model.py). A draft
that cannot serve is refused in one line before any shard starts."""

import json
import shutil
import subprocess

import aiohttp
import pytest
from test_speculative_serving import cancel_mid_run, info, plain_stops_and_outputs, workload

from child_processes import PYTHON, free_port, subprocess_env
from launched_server import servers_side_by_side

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(demo_dir, interpreter_dir, tmp_path_factory):
    """No speculation (1 shard); the demo as its own draft, k = 3, 2 shards (tp), multi-step decode on, without
    the cost back-off; the
    smaller interpreter checkpoint as draft, k = 1, 1 shard, multi-step off: started side by side."""
    flags = ["--model", str(demo_dir), "--max-kv-blocks", "256", "--block-size", "4"]
    flags += ["--max-batch-prefill-tokens", "64"]
    variants = {
        "plain": ["--num-shard", "1"],
        "own_k3_tp2": [
            *("--num-shard", "2", "--speculate", "3", "--speculative-model", str(demo_dir)),
            "--no-speculate-cost-back-off",  # the model as its own draft costs more than it gains
        ],
        "small_k1": [
            *("--num-shard", "1", "--speculate", "1", "--max-decode-steps", "1"),
            *("--speculative-model", str(interpreter_dir)),
        ],
    }
    yield from servers_side_by_side(tmp_path_factory, flags, variants)


async def test_draft_outputs_equal_plain_outputs(servers):
    plain = servers["plain"].url
    stops, expected = await plain_stops_and_outputs(plain)
    for name in ("own_k3_tp2", "small_k1"):
        url = servers[name].url
        got, answers = await workload(url, stops)
        assert got == expected, name
        assert any(a["details"]["finish_reason"] == "stop_sequence" for a in answers)
        proposed = sum(a["details"]["speculative_proposed"] for a in answers)
        accepted = sum(a["details"]["speculative_accepted"] for a in answers)
        assert proposed > 0 and accepted <= proposed, (name, accepted, proposed)
        if name == "own_k3_tp2":
            # Greedy picks always agree with the model's own; seeded draws now and then do not.
            assert 0 < accepted < proposed
        await cancel_mid_run(url)
        async with aiohttp.ClientSession() as session:
            state = await info(session, url)
        assert state["kv_blocks_used"] == 0
        assert state["speculative_model"] and state["speculate"] in (1, 3)
    async with aiohttp.ClientSession() as session:
        assert (await info(session, plain))["speculative_model"] is None


def refusal(*flags: str) -> tuple[int, str]:
    """`mixserve launch` with `flags`: its exit code and its startup_refused / startup_failed lines."""
    done = subprocess.run(
        [PYTHON, "-m", "mixserve.cli", "launch", "--port", str(free_port()), *flags],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "event=startup_" in line]
    return done.returncode, "\n".join(lines)


def test_a_draft_that_cannot_serve_is_refused_before_any_shard_starts(demo_dir, interpreter_dir, tmp_path):
    other = tmp_path / "other-vocab"
    shutil.copytree(interpreter_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    code, lines = refusal("--model", str(demo_dir), "--speculate", "2", "--speculative-model", str(other))
    assert code == 2 and len(lines.splitlines()) == 1 and "differs from the model's" in lines, lines
    code, lines = refusal("--model", str(demo_dir), "--speculate", "2", "--speculative-model", str(tmp_path / "none"))
    assert code == 2 and "its config does not load" in lines, lines
    code, lines = refusal("--model", str(demo_dir), "--speculative-model", str(interpreter_dir))
    assert code == 1 and "needs --speculate K" in lines, lines


def test_history_tokens_without_ngram_speculation_are_refused(demo_dir, interpreter_dir):
    """--speculate-history-tokens feeds n-gram lookup: refused without --speculate K, and beside a draft model."""
    history = ("--speculate-history-tokens", "64")
    code, lines = refusal("--model", str(demo_dir), *history)
    assert code == 1 and "--speculate-history-tokens is for n-gram speculation" in lines, lines
    code, lines = refusal(
        "--model", str(demo_dir), "--speculate", "2", "--speculative-model", str(interpreter_dir), *history
    )
    assert code == 1 and "--speculate-history-tokens is for n-gram speculation" in lines, lines
