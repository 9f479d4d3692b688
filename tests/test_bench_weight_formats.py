"""The benchmark harness's weight formats: `mixserve bench decode-step` times fp32, bf16 and int8-wo
decode steps in-process (tabulated, the kernels' path recorded), and `bench compare` serves mixserve
with launch flags as a variant of its own (`--mixserve NAME=ARGS`)."""

import argparse
import json

import pytest

from mixserve.benchmarks import decode_step
from mixserve.benchmarks.roofline import ModelFootprint
from mixserve.benchmarks.systems import find_systems


def test_compare_serves_weight_formats_as_mixserve_variants(demo_dir, tmp_path):
    variants = {"int8": ["--num-shard", "1", "--dtype", "bfloat16", "--quantize", "int8-wo"]}
    found, _ = find_systems(
        ["mixserve-2", "mixserve-int8"], str(demo_dir), [tmp_path], [tmp_path], llama_servers=[], variants=variants
    )
    plain, int8 = found
    assert plain.cmd[plain.cmd.index("--num-shard") + 1] == "2" and "--quantize" not in plain.cmd
    assert int8.name == "mixserve-int8"
    assert int8.cmd[-6:] == ["--num-shard", "1", "--dtype", "bfloat16", "--quantize", "int8-wo"]  # later flags win
    assert int8.description == "mixserve, --num-shard 1 --dtype bfloat16 --quantize int8-wo"


def decode_step_args(demo_dir, **given) -> argparse.Namespace:
    """`mixserve bench decode-step`'s arguments on the demo checkpoint, context 20, one rank unless `given`."""
    defaults = {"model": str(demo_dir), "config": None, "num_layers": None, "context": 20, "out": None, "num_shard": 1}
    return argparse.Namespace(**(defaults | given))


def test_decode_step_times_each_weight_format(native, demo_dir, tmp_path, capsys):  # noqa: ARG001 - the C kernels
    out = tmp_path / "steps.json"
    args = decode_step_args(demo_dir, variants="fp32,bf16,int8", rounds=2, out=out)
    assert decode_step.run(args) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["fp32", "bf16", "int8"]
    assert results["int8"]["weight_bytes"] < results["bf16"]["weight_bytes"] < results["fp32"]["weight_bytes"]
    assert all(r["decoder_layers"] == "native" and r["median_ms"] > 0 for r in results.values())
    assert all(r["read_median_ms"] > 0 and r["roofline_fraction"] > 0 for r in results.values())
    assert results["int8"]["step_read_bytes"] < results["bf16"]["step_read_bytes"] < results["fp32"]["step_read_bytes"]
    assert "| int8 |" in capsys.readouterr().out


def test_a_steps_read_bytes_are_the_rooflines_batch_1_bytes(demo_dir):
    """What a step reads, counted from the loaded weights, is what the roofline's footprint computes from
    the config (embedding row, dense weights, top-k of E experts, LM head, the KV of the context); int8
    codes and their row scales are about half of bf16's."""
    import torch

    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.kv_cache import KVCache

    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    read = {}
    for variant, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8-bf16", torch.bfloat16)):
        model, _ = decode_step._load(str(demo_dir), "auto", variant, parallel, group)
        cfg = model.config
        cache = KVCache(cfg.num_hidden_layers, 4, 16, cfg.num_key_value_heads, cfg.head_dim, dtype, torch.device("cpu"))
        read[variant] = decode_step.step_read_bytes(model, cache, context=20)
        if variant != "int8-bf16":  # the footprint's context is the cached tokens before the decoded one
            footprint = ModelFootprint.from_pretrained(demo_dir, dtype_bytes=dtype.itemsize)
            assert read[variant] == footprint.decode_bytes(1, 19)
    assert read["fp32"] == 2 * read["bf16"]
    assert 0.45 * read["bf16"] < read["int8-bf16"] < 0.6 * read["bf16"]


def test_decode_step_refuses_unknown_variants(demo_dir):
    args = decode_step_args(demo_dir, variants="fp8", rounds=1)
    with pytest.raises(SystemExit, match="unknown variants"):
        decode_step.run(args)


@pytest.mark.slow
def test_decode_step_runs_on_tensor_parallel_ranks(native, demo_dir, tmp_path, capsys):  # noqa: ARG001 - the C kernels
    out = tmp_path / "steps.json"
    args = decode_step_args(demo_dir, variants="bf16,int8-bf16", rounds=3, out=out, num_shard=2)
    assert decode_step.run(args) == 0
    written = json.loads(out.read_text())
    results = written["results"]
    assert written["num_shard"] == 2 and list(results) == ["bf16", "int8-bf16"]
    one_rank = argparse.Namespace(**{**vars(args), "num_shard": 1, "out": tmp_path / "one.json", "rounds": 1})
    assert decode_step.run(one_rank) == 0
    whole = json.loads((tmp_path / "one.json").read_text())["results"]
    for name, r in results.items():  # each rank holds about half the weights (embeddings and norms whole)
        assert 0.4 * whole[name]["weight_bytes"] < r["weight_bytes"] < 0.75 * whole[name]["weight_bytes"]
        assert r["decoder_layers"] == "native" and r["median_ms"] > 0
    assert "2 tensor-parallel ranks" in capsys.readouterr().out
