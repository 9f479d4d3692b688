"""`mixserve bench soak` itself: a 10-second soak of a 1-shard server it launches, every request
accounted for on both sides and the report written; and the checks turning red on a leak."""

import copy
import json

import pytest

from mixserve.benchmarks.metrics import RequestRecord
from mixserve.benchmarks.soak_load import GENERATIONS, KINDS, OUTCOMES, generation_outcome, kind_schedule
from mixserve.benchmarks.soak_probe import shard_pids
from mixserve.benchmarks.soak_report import checks, rss_growth
from mixserve.benchmarks.soak_targets import (
    ChatSchemaTarget,
    ChatToolsTarget,
    ChoicesLogprobsTarget,
    PredictionTarget,
    WrongAnswer,
)
from mixserve.benchmarks.workload import BenchRequest
from mixserve.cli import main

SOAK_SECONDS = 10


@pytest.fixture(scope="module")
def soak(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    code = main(
        [
            "bench", "soak", "--model", str(demo_dir), "--num-shard", "1", "--minutes", str(SOAK_SECONDS / 60),
            "--concurrency", "4", "--warmup", "2", "--window", "3", "--sample-every", "1", "--out", str(out),
            # Ten seconds is too short for a steady state; the RSS check is only exercised here.
            "--max-rss-growth", "25", "--max-body-bytes", "65536",
        ]
    )  # fmt: skip
    return code, out, json.loads((out / "soak.json").read_text())


@pytest.mark.slow
def test_every_request_is_accounted_for_and_the_report_written(soak):
    code, out, result = soak
    load, server = result["load"], result["server"]
    assert code == 0 and result["passed"], (out / "soak.md").read_text()
    requests = result["requests"]
    assert load["sent"] == load["ended"] == len(requests) == server["answered"] >= len(KINDS)
    recounted = {name: sum(r["outcome"] == name for r in requests) for name in OUTCOMES}
    assert recounted == load["outcomes"] and recounted["lost"] == recounted["unexpected"] == 0
    assert {r["kind"] for r in requests} == set(KINDS)
    for r in requests:
        if r["kind"] in GENERATIONS:
            assert (r["outcome"], r["status"]) == ("ok", 200), r
        elif r["kind"] == "cancelled_stream":
            assert r["outcome"] in ("cancelled", "ok") and r["status"] == 200, r
        else:
            assert r["outcome"] == "refused" and 400 <= r["status"] < 500, r
    # The server's own counters tell the same story: what we finished or left it answered 200 or
    # counted as a client gone (499); what we expected refused, it refused.
    by_status = server["by_status"]
    assert by_status.get("200", 0) + by_status.get("499", 0) == recounted["ok"] + recounted["cancelled"]
    assert sum(n for s, n in by_status.items() if s.startswith("4") and s != "499") == recounted["refused"]
    assert recounted["cancelled"] > 0 and server["generations_cancelled"] > 0
    assert server["kv_blocks_used_max"] > 0 and server["kv_blocks_used_end"] == 0
    assert server["exit_code"] == 0
    # RSS of the router (the launcher's own process) and of the shard its log named.
    assert {"router", "shard-0"} <= set(result["rss"])
    assert all(s["rss_kib"]["router"] > 0 and s["rss_kib"]["shard-0"] > 0 for s in result["samples"])
    assert len(result["meta"]["machine"]["load_average"]) == len(result["meta"]["machine_at_end"]["load_average"]) == 3
    markdown = (out / "soak.md").read_text()
    assert "**PASSED**" in markdown and "every_request_accounted | yes" in markdown
    assert "event=shard_started" in (out / "logs" / "mixserve.log").read_text()


@pytest.mark.slow
def test_checks_fail_on_a_lost_request_a_5xx_held_blocks_and_rss_growth(soak):
    _, _, result = soak
    broken = copy.deepcopy(result)
    broken["load"]["outcomes"]["lost"] += 1
    broken["load"]["statuses"]["502"] = 1
    broken["server"]["kv_blocks_used_end"] = 3
    samples = [{"t_s": t, "rss_kib": {"router": 100_000 + 1_000 * t}} for t in range(20)]
    broken["rss"] = rss_growth(samples, warmup_s=2, window_s=5, load_s=19)
    assert broken["rss"]["router"]["first_window_max_kib"] == 106_000
    assert broken["rss"]["router"]["last_window_max_kib"] == 119_000
    failed = {name for name, check in checks(broken, max_rss_growth_pct=5.0).items() if check["ok"] is False}
    assert failed == {"every_request_accounted", "none_lost", "no_5xx", "kv_blocks_back_to_0", "rss_growth"}


def test_the_mix_sends_every_kind_first_then_the_same_draw_for_a_seed():
    assert [kind_schedule(i, seed=0) for i in range(len(KINDS))] == list(KINDS)
    drawn = [kind_schedule(i, seed=0) for i in range(len(KINDS), 500)]
    assert drawn == [kind_schedule(i, seed=0) for i in range(len(KINDS), 500)]
    assert drawn != [kind_schedule(i, seed=1) for i in range(len(KINDS), 500)]
    assert set(drawn) == set(KINDS)


def test_shard_pids_come_from_the_launcher_log_the_latest_start_of_each_rank_and_group():
    log = "\n".join(
        [
            "event=shard_started rank=0 pid=11 address=unix:/s/g0-0.sock group=0",
            "event=shard_started rank=0 pid=21 address=unix:/s/g1-0.sock group=1",
            "event=group_restarting group=0",
            "event=shard_started rank=0 pid=12 address=unix:/s/g0-0.sock group=0",
        ]
    )
    assert shard_pids(log) == {"shard-0": 12, "g1-shard-0": 21}


def test_the_feature_kinds_tell_a_wrong_answer_from_a_right_one():
    def answer(finish: str, content: str) -> dict:
        return {"choices": [{"finish_reason": finish, "message": {"content": content}}]}

    schema = ChatSchemaTarget("http://x", "m")
    schema.check(answer("stop", '{"city": "Oslo", "count": 3}'))
    wrong = ('{"city": "Oslo"}', '{"city": "Oslo", "count": 3.5}', '{"city": "Oslo, Norway!!", "count": 1}')
    for content in (*wrong, '{"ci', None):  # the last two: no JSON at all
        with pytest.raises(WrongAnswer):
            schema.check(answer("stop", content))
    schema.check(answer("length", '{"city": "Os'))  # the token limit, not the grammar, ended it

    call = {"function": {"name": "get_weather", "arguments": '{"city": "Oslo", "count": 3}'}}
    tools = ChatToolsTarget("http://x", "m")
    tools.check({"choices": [{"finish_reason": "tool_calls", "message": {"tool_calls": [call]}}]})
    with pytest.raises(WrongAnswer, match="not a call"):
        tools.check({"choices": [{"finish_reason": "stop", "message": {"content": "sunny", "tool_calls": None}}]})

    def choice(i: int, tokens: int) -> dict:
        return {"index": i, "logprobs": {"tokens": ["a"] * tokens, "top_logprobs": [{"a": -1.0}] * tokens}}

    logprobs = ChoicesLogprobsTarget("http://x", "m")
    logprobs.check({"choices": [choice(0, 2), choice(1, 3)], "usage": {"completion_tokens": 5}})
    with pytest.raises(WrongAnswer, match="choices"):
        logprobs.check({"choices": [choice(0, 2)], "usage": {"completion_tokens": 2}})
    with pytest.raises(WrongAnswer, match="usage says"):
        logprobs.check({"choices": [choice(0, 2), choice(1, 3)], "usage": {"completion_tokens": 6}})
    # A wrong answer is the soak's `unexpected`, not a lost request.
    record = RequestRecord(4, 8, status=200, error="WrongAnswer: with a prediction 'b', without 'a'")
    assert generation_outcome("completions_prediction", record, 0.0).outcome == "unexpected"


@pytest.mark.slow
async def test_a_predicted_answer_is_compared_with_the_prompts_first(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--max-kv-blocks", "64")
    request = BenchRequest("The quick brown fox", 5, 12)
    async with PredictionTarget(server.url, "m", temperature=1.0, ignore_eos=True) as target:
        first = await target.send(request)  # no prediction yet: its answer is kept
        assert first.ok and target.first == {request.prompt: first.text} and first.text
        again = await target.send(request)  # its edited answer as prediction: the same text
        assert again.ok and again.text == first.text, again.error
        target.first[request.prompt] = "another answer"
        wrong = await target.send(request)
    assert not wrong.ok and wrong.error.startswith("WrongAnswer")
    assert generation_outcome("completions_prediction", wrong, 0.0).outcome == "unexpected"
