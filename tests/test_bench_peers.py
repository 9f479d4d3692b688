"""`bench compare`'s systems: llama.cpp as a peer (discovery, GGUF cache, slot sizing, a real llama-server
where one is installed) and mixserve launched with extra flags (`--mixserve NAME=ARGS`)."""

import argparse
import asyncio
import json
import os
import urllib.request
from pathlib import Path

import pytest

from mixserve.benchmarks import compare, llamacpp, systems
from mixserve.benchmarks.llamacpp_gguf import UNMERGED_SCORE, merge_scores
from mixserve.benchmarks.processes import ServerProcess, free_port
from mixserve.benchmarks.serve import ServeConfig, run_benchmark
from mixserve.benchmarks.workload import (
    DEMO_CORPUS,
    WorkloadConfig,
    bench_schema,
    build_requests,
    count_tokens,
    load_tokenizer,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_context_holds_every_slot_whole():
    assert llamacpp.context_size(8, 128, 128) == 8 * (128 + 128 + llamacpp.CONTEXT_MARGIN)
    assert llamacpp.context_size(1, 64, 64, margin=0) == 128
    with pytest.raises(ValueError, match="slots"):
        llamacpp.context_size(0, 64, 64)


def test_llama_server_command_line():
    cmd = llamacpp.server_command(Path("/bin/llama-server"), Path("/m.gguf"), 8123, slots=32, context=8704, threads=2)
    assert cmd[0] == "/bin/llama-server" and cmd[cmd.index("-m") + 1] == "/m.gguf"
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert (flags["-c"], flags["-np"], flags["-t"]) == ("8704", "32", "2")
    assert "--cont-batching" in cmd and "--no-webui" in cmd


def test_llama_server_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXSERVE_LLAMA_SERVER", raising=False)
    home = tmp_path / "cache" / "peers" / "llama.cpp"
    assert llamacpp.server_candidates(None) == [home / "llama-server", home / "build" / "bin" / "llama-server"]
    monkeypatch.setenv("MIXSERVE_LLAMA_SERVER", "/elsewhere/llama-server")
    assert llamacpp.server_candidates(None)[0] == Path("/elsewhere/llama-server")
    assert llamacpp.server_candidates(tmp_path / "given") == [tmp_path / "given"]

    plain, runnable = tmp_path / "plain", tmp_path / "runnable"
    plain.write_text("")
    runnable.write_text("")
    runnable.chmod(0o755)
    assert llamacpp.find_server([tmp_path / "missing", plain, runnable]) == runnable
    assert llamacpp.find_server([plain]) is None


def test_converter_is_found_in_the_build_tree(tmp_path):
    binary = tmp_path / "llama.cpp" / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    assert llamacpp.find_converter(binary) is None
    (tmp_path / "llama.cpp" / llamacpp.CONVERTER).write_text("")
    assert llamacpp.find_converter(binary) == tmp_path / "llama.cpp" / llamacpp.CONVERTER


def test_gguf_cache_key_follows_the_checkpoint_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"1234")
    first = llamacpp.gguf_path(model, "f32", tmp_path / "gguf")
    assert first.parent == tmp_path / "gguf" and first.name.endswith("-f32.gguf")
    assert llamacpp.gguf_path(model, "f32", tmp_path / "gguf") == first
    assert llamacpp.gguf_path(model, "bf16", tmp_path / "gguf") != first
    os.utime(weights, ns=(0, 0))
    assert llamacpp.gguf_path(model, "f32", tmp_path / "gguf") != first
    with pytest.raises(ValueError, match="dtype"):
        llamacpp.gguf_path(model, "f16")


def test_missing_llama_server_is_skipped_with_the_reason(tmp_path):
    names = ["llama.cpp-f32", "llama.cpp-q8_0"]
    found, skipped = systems.find_systems(names, str(tmp_path), [], [], llama_servers=[tmp_path / "no-llama-server"])
    assert found == [] and set(skipped) == set(names)
    assert "no llama-server at" in skipped["llama.cpp-f32"] and "--llama-server" in skipped["llama.cpp-f32"]
    with pytest.raises(ValueError, match="unknown llama.cpp dtype"):
        systems.find_systems(["llama.cpp-f16"], str(tmp_path), [], [], llama_servers=[])


def test_llama_slots_follow_the_sweep():
    args = parse("--concurrency", "1", "8", "32", "--input-len", "128", "--output-len", "100", "--output-spread", "0.5")
    assert compare.max_output_len(args) == 150
    assert parse("--llama-dtype", "bf16", "--llama-dtype", "q8_0").llama_dtype == ["bf16", "q8_0"]
    with pytest.raises(SystemExit):
        parse("--llama-dtype", "f16")


def test_mixserve_variants_parse_and_launch_with_their_flags(tmp_path):
    assert systems.parse_variant("bf16=--num-shard 2 --dtype bfloat16") == (
        "bf16",
        ["--num-shard", "2", "--dtype", "bfloat16"],
    )
    assert systems.parse_variant("spec3=--speculate 3 --speculate-max-batch '8'") == (
        "spec3",
        ["--speculate", "3", "--speculate-max-batch", "8"],
    )
    assert systems.parse_variant("plain=") == ("plain", [])
    for bad in ("no-equals", "=--speculate 3", "a b=--x", "2=--speculate 3", "q=--x 'open"):
        with pytest.raises(ValueError, match="--mixserve"):
            systems.parse_variant(bad)

    variants = dict(
        map(systems.parse_variant, parse("--mixserve", "s3=--speculate 3", "--mixserve", "one=--num-shard 1").mixserve)
    )
    found, skipped = systems.find_systems(
        ["mixserve-s3", "mixserve-one", "mixserve-2"], "/m", [], [], variants=variants
    )
    assert not skipped
    by_name = {s.name: s.cmd for s in found}
    assert by_name["mixserve-s3"][-2:] == ["--speculate", "3"]
    assert by_name["mixserve-s3"][by_name["mixserve-s3"].index("--num-shard") + 1] == str(systems.VARIANT_SHARDS)
    # argparse keeps the last --num-shard: the variant's own.
    assert by_name["mixserve-one"][-2:] == ["--num-shard", "1"]
    assert "--speculate" not in by_name["mixserve-2"]
    with pytest.raises(ValueError, match="unknown system"):
        systems.find_systems(["mixserve-nope"], "/m", [], [], variants=variants)


def test_a_variants_leading_assignments_set_its_servers_environment():
    name, args = systems.parse_variant("tiles=MIXSERVE_KERNEL_CFLAGS='-mno-amx-tile -O2' X_1=y --num-shard 1 A=b")
    assert systems.split_environment(args) == (
        {"MIXSERVE_KERNEL_CFLAGS": "-mno-amx-tile -O2", "X_1": "y"},
        ["--num-shard", "1", "A=b"],
    )
    (system,), _ = systems.find_systems(["mixserve-tiles"], "/m", [], [], variants={name: args})
    assert system.env["MIXSERVE_KERNEL_CFLAGS"] == "-mno-amx-tile -O2" and system.env["X_1"] == "y"
    assert "MIXSERVE_KERNEL_CFLAGS=-mno-amx-tile" not in " ".join(system.cmd) and system.cmd[-1] == "A=b"
    assert "PATH" in system.env  # the harness's own environment for children, plus the assignments


def test_speculation_counters_are_read_from_metrics():
    page = (
        "# HELP mixserve_speculative_proposed_tokens_total Tokens proposed\n"
        "mixserve_speculative_proposed_tokens_total 40.0\n"
        "mixserve_speculative_accepted_tokens_total 30.0\n"
        "mixserve_speculative_accepted_tokens_created 1.7e9\n"
    )
    assert compare.speculation_counters(page) == {"proposed": 40.0, "accepted": 30.0, "acceptance": 0.75}
    assert compare.speculation_counters("mixserve_requests_total 3.0\n") is None


def test_merge_scores_rank_tokens_by_their_merge(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"merges": ["a b", ["ab", "c"], "a b"]}}))
    assert merge_scores(path) == {"ab": 0.0, "abc": -1.0}
    assert UNMERGED_SCORE < -1.0


@pytest.mark.slow
def test_llama_server_serves_the_converted_demo(demo_dir, tmp_path):
    server = llamacpp.find_server(llamacpp.server_candidates(None))
    if server is None:
        pytest.skip("no llama-server installed (set MIXSERVE_LLAMA_SERVER; recipe in benchmarks/peers.md)")
    converter = llamacpp.find_converter(server)
    if converter is None:
        pytest.skip(f"no {llamacpp.CONVERTER} in the llama.cpp tree of {server}")
    gguf = llamacpp.ensure_gguf(converter, demo_dir, "f32", tmp_path / "convert.log", tmp_path / "gguf")
    assert llamacpp.ensure_gguf(converter, demo_dir, "f32", tmp_path / "unused.log", tmp_path / "gguf") == gguf
    assert not (tmp_path / "unused.log").exists()

    port = free_port()
    cmd = llamacpp.server_command(server, gguf, port, slots=1, context=llamacpp.context_size(1, 32, 8), threads=1)
    process = ServerProcess("llama.cpp", cmd, tmp_path / "server.log", dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_http_ready(f"{url}/health", 120)
        tokenizer = load_tokenizer(demo_dir)
        workload = WorkloadConfig(input_len=32, output_len=8)
        prompt = build_requests(tokenizer, workload, 1, stream=1)[0].prompt
        body = json.dumps({"content": prompt}).encode()
        request = urllib.request.Request(f"{url}/tokenize", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["tokens"] == tokenizer.encode(prompt, add_special_tokens=False).ids
        config = ServeConfig(
            url, str(demo_dir), target="openai", concurrency=[1], num_prompts=1, warmup=0, workload=workload
        )
        config.keepalive, config.progress = False, False
        result = asyncio.run(run_benchmark(config, "llama.cpp"))
    finally:
        process.stop()
    records = result["levels"][0]["_records"]
    assert [(r.ok, r.output_tokens, r.count_method) for r in records] == [(True, 8, "usage")]


def _corpus_workload(demo_dir, kind: str):
    """The tokenizer, a config of 128-token prompts of `kind`, its 12 requests (each exactly 128 tokens,
    the same from the same seed) and the corpus they come from."""
    tokenizer = load_tokenizer(demo_dir)
    config = WorkloadConfig(input_len=128, output_len=16, seed=3, kind=kind)
    requests = build_requests(tokenizer, config, 12)
    assert [count_tokens(tokenizer, r.prompt) for r in requests] == [128] * 12
    assert requests == build_requests(tokenizer, config, 12)
    assert parse("--workload", kind).workload == kind
    return tokenizer, config, requests, DEMO_CORPUS.read_text(encoding="utf-8")


def test_corpus_prompts_are_exact_passages_of_the_corpus(demo_dir):
    tokenizer, config, requests, corpus = _corpus_workload(demo_dir, "corpus")
    assert all(r.prompt in corpus and not r.prompt[0].isspace() for r in requests)
    assert len({r.prompt for r in requests}) == 12 and all(r.max_tokens == 16 for r in requests)
    assert requests != build_requests(tokenizer, config, 12, stream=1)
    with pytest.raises(ValueError, match="workload"):
        WorkloadConfig(kind="quotes")


def test_json_requests_are_corpus_passages_under_the_bench_schema(demo_dir):
    _, _, requests, corpus = _corpus_workload(demo_dir, "json")
    assert all(r.prompt in corpus and r.json_schema == bench_schema() for r in requests)
    assert bench_schema()["additionalProperties"] is False and bench_schema("t") != bench_schema()


def test_copy_prompts_start_their_passage_over(demo_dir):
    tokenizer, _, requests, corpus = _corpus_workload(demo_dir, "copy")
    for request in requests:
        # 111 passage tokens, a line break, then the passage's first 16 tokens again (the passage and
        # its head may hold line breaks of their own).
        text = request.prompt
        splits = [(text[:i], text[i + 1 :]) for i, c in enumerate(text) if c == "\n"]
        assert any(
            passage in corpus
            and passage.startswith(head)
            and count_tokens(tokenizer, passage) == 111
            and count_tokens(tokenizer, head) == 16
            for passage, head in splits
        )
