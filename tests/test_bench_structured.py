"""`mixserve bench structured` itself, at tiny settings against a 1-shard demo server it launches: the
report written with finite numbers, and every constrained output that ended by stop valid JSON that
validates against the schema it was asked for."""

import json
import math

import jsonschema
import pytest

from mixserve.benchmarks.metrics import RequestRecord
from mixserve.benchmarks.structured import bench_schema, criteria
from mixserve.benchmarks.workload import BenchRequest
from mixserve.cli import main


@pytest.fixture(scope="module")
def bench(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("structured")
    code = main(
        [
            "bench", "structured", "--model", str(demo_dir), "--num-shard", "1", "--concurrency", "2",
            "--rounds", "1", "--num-prompts", "4", "--ttft-triples", "2", "--input-len", "16", "--no-progress",
            "--out", str(out),
        ]
    )  # fmt: skip
    return code, out, json.loads((out / "structured.json").read_text())


@pytest.mark.slow
def test_report_is_written_with_finite_numbers(bench):
    code, out, result = bench
    assert code == 0, (out / "structured.md").read_text()
    assert [run["name"] for run in result["runs"]] == ["A0", "B0"]
    for run in result["runs"]:
        s = run["summary"]
        assert s["errors"] == 0 and s["ok"] == len(run["requests"]) == 4
        assert math.isfinite(s["output_throughput"]) and s["output_throughput"] > 0
        assert math.isfinite(s["free_itl_ms"]["p50"])
    kinds = [r["kind"] for r in result["runs"][1]["requests"]]
    assert kinds == ["constrained", "free", "constrained", "free"]
    assert {r["kind"] for r in result["runs"][0]["requests"]} == {"free"}
    assert len(result["ttft_triples"]) == 2
    assert all(math.isfinite(v) and v > 0 for t in result["ttft_triples"] for v in t.values())
    for name in ("throughput_ratio", "free_itl_p50_ratio", "cached_schema_ttft_delta_ms"):
        criterion = result["criteria"][name]
        assert math.isfinite(criterion["value"]) and isinstance(criterion["passed"], bool)
    assert math.isfinite(result["criteria"]["new_minus_cached_ttft_ms"])
    machine, at_end = result["meta"]["machine"], result["meta"]["machine_at_end"]
    assert len(machine["load_average"]) == len(at_end["load_average"]) == 3
    markdown = (out / "structured.md").read_text()
    assert "load average at end" in markdown and "B output tok/s / A output tok/s" in markdown
    assert markdown.count("| pass |") + markdown.count("**fail** by") == 3


@pytest.mark.slow
def test_constrained_outputs_that_end_by_stop_validate_against_the_schema(bench):
    _, _, result = bench
    schema = result["workload"]["schema"]
    assert schema == bench_schema()
    constrained = [r for run in result["runs"] for r in run["requests"] if r["kind"] == "constrained"]
    by_stop = [r for r in constrained if r["finish_reason"] == "stop"]
    # The schema is bounded so that outputs end by EOS well within their token limit.
    assert len(constrained) == 2 and by_stop == constrained
    for r in by_stop:
        jsonschema.validate(json.loads(r["text"]), schema)
    assert result["constrained_outputs"] == {"constrained": 2, "finished_by_stop": 2, "parse_as_json": 2}
    # Free requests ignore EOS and generate exactly the lengths the warm-up's constrained outputs set: B's free
    # half and A's odd requests their median, A's even requests (those B constrains) each length in turn.
    workload = result["workload"]
    free = [r for run in result["runs"] for r in run["requests"] if r["kind"] == "free"]
    assert all(r["finish_reason"] == "length" for r in free)
    lengths = workload["matched_output_lens"]
    assert lengths == [n for n in result["warmup"]["constrained_output_tokens"] if n] and lengths
    for run in result["runs"]:
        asked = [r["output_tokens"] for r in run["requests"] if r["kind"] == "free"]
        if run["name"].startswith("A"):
            expected = [
                lengths[(i // 2) % len(lengths)] if i % 2 == 0 else workload["free_output_len"] for i in range(4)
            ]
        else:
            expected = [workload["free_output_len"]] * 2
        assert asked == expected, run["name"]


def test_criteria_pass_and_fail_at_their_thresholds():
    def run(name: str, tokens: int, itls: list[float]) -> dict:
        record = RequestRecord(4, 4, ok=True, token_times=[sum(itls[:i]) for i in range(len(itls) + 1)])
        summary = {"output_tokens_server": tokens, "output_tokens_counted": tokens, "duration_s": 1.0, "errors": 0}
        summary["output_throughput"] = float(tokens)
        return {"name": name, "summary": summary, "_records": [record], "_requests": [BenchRequest("p", 4, 4)]}

    triples = [{"free_ttft_ms": 10.0, "new_ttft_ms": 15.0, "cached_ttft_ms": 10.5}] * 3
    passing = criteria({"runs": [run("A0", 100, [0.01] * 3), run("B0", 90, [0.0105] * 3)], "ttft_triples": triples})
    assert passing["throughput_ratio"] == {"value": 0.9, "threshold": 0.85, "passed": True}
    assert passing["free_itl_p50_ratio"]["passed"] and passing["free_itl_p50_ratio"]["value"] == pytest.approx(1.05)
    assert passing["cached_schema_ttft_delta_ms"] == {"value": 0.5, "threshold": 1.0, "passed": True}
    assert passing["new_minus_cached_ttft_ms"] == 4.5
    assert passing["throughput_ratio_per_round"] == [0.9]
    slow = [{"free_ttft_ms": 10.0, "new_ttft_ms": 15.0, "cached_ttft_ms": 11.0}]
    failing = criteria({"runs": [run("A0", 100, [0.01] * 3), run("B0", 80, [0.012] * 3)], "ttft_triples": slow})
    assert not any(failing[name]["passed"] for name in ("throughput_ratio", "free_itl_p50_ratio"))
    assert failing["cached_schema_ttft_delta_ms"] == {"value": 1.0, "threshold": 1.0, "passed": False}


def test_the_report_warns_of_a_loaded_machine_only_when_the_load_exceeds_the_cores():
    from mixserve.benchmarks.structured_report import _load_warning

    quiet = {"machine": {"cores": 2, "load_average": [0.8, 1.0, 1.0]}, "machine_at_end": {"load_average": [1.5, 1, 1]}}
    busy = {"machine": {"cores": 2, "load_average": [0.8, 1.0, 1.0]}, "machine_at_end": {"load_average": [7.4, 8, 8]}}
    assert _load_warning(quiet) == ""
    assert "loaded machine" in _load_warning(busy)
