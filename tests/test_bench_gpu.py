"""`mixserve bench gpu`: the dry run end to end, the two layer paths against each other, the byte counts
and the server part's model directory."""

import argparse
import json
import math
import subprocess

import pytest
import torch

from child_processes import PYTHON, subprocess_env
from mixserve.benchmarks import gpu_server
from mixserve.benchmarks.gpu import suites as gpu_suites
from mixserve.benchmarks.gpu_kernels import layer_weight_bytes, run_variant, tolerance
from mixserve.benchmarks.gpu_layer import (
    MIXTRAL_8X7B_RANK,
    TINY_RANK,
    LayerWeights,
    decode_batch,
    expected_experts_hit,
    prefill_batch,
    random_pools,
    torch_layer,
    triton_layer,
)

DECODE_CASES = [f"decode b{b} c{c}" for b in (1, 3) for c in (5, 17)]
PREFILL_CASES = ["prefill 2 x 8", "chunk 8 at 24"]


def dry_run(*args: str) -> None:
    """`python -m ARGS...` in a child process, which must succeed within 5 minutes."""
    done = subprocess.run([PYTHON, "-m", *args], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.mark.slow
def test_dry_run_writes_every_case_with_agreeing_paths_and_serves(tmp_path):
    out = tmp_path / "gpu"
    dry_run("mixserve.cli", "bench", "gpu", "--dry-run", "--out", str(out))
    result = json.loads((out / "gpu.json").read_text())
    markdown = (out / "gpu.md").read_text()
    assert result["dry_run"] and result["dtype"] == "float32"
    assert _finite(result["ceilings"]["bandwidth"]["gb_s"]) and result["ceilings"]["bandwidth"]["gb_s"] > 0
    cases = {case["name"]: case for case in result["cases"]}
    assert sorted(cases) == sorted(DECODE_CASES + PREFILL_CASES)
    for name, case in cases.items():
        assert name in markdown
        expected = ["torch", "triton", "triton_graph"] if case["kind"] == "decode" else ["torch", "triton"]
        assert sorted(case["variants"]) == sorted(expected)
        assert _finite(case["bytes"]) and case["bytes"] > 0
        for variant, record in case["variants"].items():
            assert not record["oom"] and "error" not in record, (name, variant, record)
            assert _finite(record["ms"]) and record["ms"] > 0 and record["iterations"] >= 3
            assert _finite(record["roofline_pct"]) and _finite(record["gb_s"])
            if variant != "torch":
                assert record["agrees"] is True and record["rel_error"] <= tolerance(torch.float32), (name, record)
        if case["kind"] == "decode":
            assert case["variants"]["triton_graph"]["graph"] is False  # eager on the CPU, and said so
    assert [row["batch"] for row in result["whole_model"]] == [1, 3]
    for row in result["whole_model"]:
        assert all(_finite(v["ms"]) and _finite(v["roofline_pct"]) for v in row["variants"].values())
    assert len(result["targets"]) == 3
    assert all(check["verdict"].startswith("not judged") for check in result["targets"])
    # The server part ran the demo on the CPU: every request of both levels answered.
    server = result["server"]
    assert server["status"] == "ran", server
    assert [level["concurrency"] for level in server["levels"]] == [1, 2]
    assert all(level["ok"] == level["requests"] > 0 and level["errors"] == 0 for level in server["levels"])
    # Decode time a token from the server's counts: E2E less TTFT over the tokens after the first.
    for level in server["levels"]:
        per_request = level["output_tokens_server"] / level["requests"]
        expected = (level["e2e_ms"]["p50"] - level["ttft_ms"]["p50"]) / (per_request - 1)
        assert level["decode_ms"] == pytest.approx(expected, abs=1e-3) and level["decode_ms"] > 0
    assert (out / "server.log").exists()
    # Predicted outputs after the load: the same answer with the plain one as its prediction.
    prediction = server["prediction"]
    assert prediction["equal"] and prediction["completion_tokens"] == 8, prediction
    assert prediction["accepted"] + prediction["rejected"] > 0  # it speculated, without --speculate
    assert "graph column is eager" in markdown
    # The agreement part served fp32 on the CPU: every generated token is transformers' top-1.
    agreement = result["agreement"]
    assert agreement["status"] == "ran", agreement
    [run] = agreement["runs"]
    assert run["dtype"] == "float32" and run["score"]["agrees"], run
    assert run["score"]["positions"] == agreement["prompts"] * agreement["new_tokens"]
    assert run["score"]["top1_agree"] == run["score"]["positions"]
    assert "native: " in run["ops"] and (out / "agree-float32.log").exists()
    assert "Served tokens against transformers" in markdown


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_triton_layer_matches_torch_layer(step):
    torch.manual_seed(1)
    device = torch.device("cpu")
    weights = LayerWeights.random(TINY_RANK, 64, torch.float32, device)
    if step == "decode":
        batch = decode_batch(TINY_RANK, 3, 9, torch.float32, device)
    else:
        batch = prefill_batch(TINY_RANK, [(0, 5), (7, 6)], torch.float32, device)
    cache = random_pools(TINY_RANK, batch.block_tables.numel(), torch.float32, device)
    expected = torch_layer(TINY_RANK, weights, tuple(t.clone() for t in cache), batch)
    got = triton_layer(TINY_RANK, weights, cache, batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_rank_bytes_match_mixtral_8x7b_rank_of_four():
    shapes = MIXTRAL_8X7B_RANK
    layers = shapes.layers * layer_weight_bytes(shapes, 2, shapes.experts)
    embedding_and_head = 2 * 2 * shapes.vocab * shapes.hidden
    assert (layers + embedding_and_head) / 2**30 == pytest.approx(21.7, abs=0.1)
    # One expert's slice on one rank: w1, w3 and w2 of 4096 x 3584 in bf16.
    assert layer_weight_bytes(shapes, 2, 1) - layer_weight_bytes(shapes, 2, 0) == 3 * 4096 * 3584 * 2


def test_expected_experts_hit():
    assert expected_experts_hit(MIXTRAL_8X7B_RANK, 1) == pytest.approx(2.0)
    assert expected_experts_hit(MIXTRAL_8X7B_RANK, 64) == pytest.approx(8.0, abs=1e-6)
    assert 2.0 < expected_experts_hit(MIXTRAL_8X7B_RANK, 2) < 4.0


def test_server_model_dir_has_mixtral_shapes_and_a_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from mixserve.shards.config import ModelConfig

    model_dir = gpu_server.write_model_dir(tmp_path / "mixtral")
    config = ModelConfig.from_pretrained(model_dir)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_local_experts) == (32, 8, 8)
    assert not list(model_dir.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("a short prompt")["input_ids"]
    assert ids and max(ids) < json.loads((model_dir / "config.json").read_text())["vocab_size"]


@pytest.mark.slow
def test_server_part_detects_the_launch_flag():
    from mixserve.router import launcher

    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    assert gpu_server.launch_supports_dummy_weights() == ("--load-format" in parser.format_help())
    assert "no CUDA device" in gpu_server.skip_reason("cpu")


def test_cases_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    from mixserve.benchmarks import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(["--dry-run", "--skip-server", "--time-budget", "0.001", "--out", str(tmp_path)])
    assert gpu.run(args) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert sorted(case["name"] for case in result["cases"]) == sorted(DECODE_CASES + PREFILL_CASES)
    assert all(case["skipped"] == "time budget spent" for case in result["cases"])
    assert result["whole_model"] == [] and result["targets"] == []
    assert "skipped: time budget spent" in (tmp_path / "gpu.md").read_text()


def test_out_of_memory_and_failures_are_recorded_not_raised():
    suite = gpu_suites()[1]

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    def broken():
        raise RuntimeError("operation not permitted when stream is capturing")

    record, out = run_variant("torch", out_of_memory, torch.device("cpu"), suite)
    assert record["oom"] is True and record["ms"] is None and out is None
    record, out = run_variant("triton_graph", broken, torch.device("cpu"), suite)
    assert record["oom"] is False and "stream is capturing" in record["error"] and out is None
    ok = torch.ones(3)
    record, out = run_variant("triton", lambda: (lambda: ok * 2, False), torch.device("cpu"), suite)
    assert record["ms"] > 0 and record["iterations"] >= 3
    torch.testing.assert_close(out, ok * 2)


def test_agreement_scores_misses_by_the_reference_gap():
    """A served token that is not the reference's top-1 counts as a miss; a near tie passes, a clear
    difference fails (the reference: a fixed table of logits per position)."""
    from mixserve.benchmarks.gpu_agree import score

    table = torch.tensor([[0.0, 5.0, 4.999, 1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0]])

    class Reference:
        def __call__(self, ids):
            # Position i's logits are row i - 1 of the table (the prompt is one token).
            return type("Out", (), {"logits": torch.cat([table, table[:1]])[: ids.shape[1]].unsqueeze(0)})

    exact = score(Reference(), [{"prompt": [7], "generated": [1, 0, 2]}], "cpu", 1e-2)
    assert (exact["top1_agree"], exact["positions"], exact["agrees"]) == (3, 3, True)
    tie = score(Reference(), [{"prompt": [7], "generated": [2, 0, 2]}], "cpu", 1e-2)
    assert tie["top1_agree"] == 2 and tie["greedy_prefix_tokens"] == 0 and tie["agrees"]
    assert 0 < tie["max_gap"] < 1e-2
    wrong = score(Reference(), [{"prompt": [7], "generated": [1, 0, 3]}], "cpu", 1e-2)
    assert wrong["top1_agree"] == 2 and wrong["greedy_prefix_tokens"] == 2 and not wrong["agrees"]
    assert wrong["misses"] == [{"prompt": 0, "position": 2, "reference": 2, "served": 3, "gap": wrong["max_gap"]}]
    # A miss passes when transformers in the served dtype misses as many positions on the same tokens.
    assert score(Reference(), [{"prompt": [7], "generated": [1, 0, 3]}], "cpu", 1e-2, baseline_misses=1)["agrees"]
    assert not score(Reference(), [{"prompt": [7], "generated": [1, 0, 3]}], "cpu", 1e-2, baseline_misses=0)["agrees"]


@pytest.mark.slow
def test_profile_dry_run_writes_each_kernel_and_tile(tmp_path):
    """`gpu_profile --dry-run`: the GPU profile's code at tiny shapes on the CPU (Triton interpreted, the
    CPU profiler): the layer's ops with their times, and the MoE timed with its default tile and another."""
    dry_run("mixserve.benchmarks.gpu_profile", "--dry-run", str(tmp_path))
    result = json.loads((tmp_path / "profile.json").read_text())
    [case] = result["kernels"]
    assert case["batch"] == 1 and case["graph_us"] > 0
    assert any("linear" in row["kernel"] for row in case["rows"]) and all(row["us"] > 0 for row in case["rows"])
    [size] = result["moe"]
    assert size["tokens"] == 1 and size["experts_hit"] >= 1 and size["align_us"] > 0
    assert [row["tile"].startswith("default") for row in size["rows"]] == [True, False]
    assert all(row["us"] > 0 and "error" not in row for row in size["rows"])
    assert "fused_moe, 1 tokens" in (tmp_path / "profile.md").read_text()


def test_sampling_dry_run_times_every_case_both_ways(tmp_path):
    """`gpu_sampling --dry-run`: every case and batch timed with pinned and with pageable copies, and the
    pageable variant's patch undone afterwards."""
    from mixserve.benchmarks.gpu_sampling import BATCHES, CASES, main
    from mixserve.shards import draw, logits_processors, sampling
    from mixserve.shards.host_to_device import tensor_to_device, to_device

    assert main(["--dry-run", str(tmp_path)]) == 0
    rows = [line.split("|")[1:-1] for line in (tmp_path / "sampling.md").read_text().splitlines()]
    timed = [row for row in rows if len(row) == 5 and row[1].strip().isdigit()]
    assert [(row[0].strip(), int(row[1])) for row in timed] == [(case, b) for case in CASES for b in BATCHES]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in timed)
    assert sampling.to_device is draw.to_device is logits_processors.to_device is to_device
    assert logits_processors.tensor_to_device is tensor_to_device


@pytest.mark.slow
def test_spec_dry_run_trains_both_models_and_serves_every_arm(tmp_path):
    """`bench gpu-spec --dry-run`: a tiny target and draft trained on the CPU, then every arm's server on
    its workload (corpus, or JSON-constrained) with the speculation counters read back (the draft always
    proposes its first token; a JSON request the tokens its schema forces)."""
    from mixserve.benchmarks.gpu_spec import ARMS

    dry_run("mixserve.cli", "bench", "gpu-spec", "--dry-run", "--out", str(tmp_path))
    result = json.loads((tmp_path / "spec.json").read_text())
    assert result["dry_run"] and sorted(result["models"]) == ["draft", "target"]
    assert all(info["seconds"] > 0 for info in result["models"].values())
    arms = {arm["arm"]: arm for arm in result["arms"]}
    assert list(arms) == [name for name, _, _ in ARMS]
    for name, arm in arms.items():
        assert arm["status"] == "ran", arm
        [level] = arm["levels"]
        assert level["ok"] == level["requests"] == 2 and level["errors"] == 0 and level["output_throughput"] > 0
        assert (tmp_path / f"{name}.log").is_file()
        assert arm["speculation"] is not None
        # A request with a prediction speculates on every arm, the draft's cost back-off included (its
        # cost prior is of requests with predictions, not of draft proposals).
        assert arm["prediction"]["equal"] and arm["prediction"]["accepted"] > 0, arm
    assert arms["plain"]["speculation"]["proposed"] == 0 == arms["plain-json"]["speculation"]["proposed"]
    assert all(arms[name]["speculation"]["proposed"] > 0 for name in arms if name.startswith("draft-"))
    # JSON-constrained requests propose what the schema forces, whatever the tiny model says: with --speculate
    # and by default.
    assert arms["ngram-k5-json"]["speculation"]["proposed"] > 0 and arms["default-json"]["speculation"]["proposed"] > 0
    markdown = (tmp_path / "spec.md").read_text()
    assert all(f"| {name} | {arm['workload']} | ran |" in markdown for name, arm in arms.items())
