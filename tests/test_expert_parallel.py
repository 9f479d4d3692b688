"""Expert parallelism (`moe_parallel` ep) layer by layer, in this process.

Each simulated rank loads its own experts from the real demo checkpoint and runs its MoE layer with
a world-size-1 group (so the closing all-reduce is a no-op); the sum of the ranks' partial outputs
is what the all-reduce would give, and must equal the whole layer. The whole model over real
process groups is in test_model_parallel.py.
"""

import dataclasses
import subprocess

import pytest
import torch
from safetensors import safe_open

from child_processes import PYTHON, subprocess_env
from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.layers.moe import SparseMoE, held_expert_ids, route
from mixserve.shards.ops.reference import fused_moe
from mixserve.shards.quant.config import QuantizationConfig

PREFIX = "model.layers.1.block_sparse_moe"
SOLO = TensorParallelGroup(ParallelConfig())


def load_layer(demo_dir, parallel: ParallelConfig, quantization: QuantizationConfig | None = None):
    """The MoE layer of `PREFIX` as rank `parallel.rank` loads it; also the bytes it read."""
    config = ModelConfig.from_pretrained(demo_dir)
    layer = SparseMoE(config, parallel, SOLO)
    layer.quantization = quantization
    reader = CheckpointReader(demo_dir)
    try:
        layer.load(reader, PREFIX)
    finally:
        reader.close()
    return layer, reader.bytes_read


def hidden_states(config: ModelConfig, tokens: int) -> torch.Tensor:
    return torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_reads_and_holds_only_its_whole_experts(demo_dir, world_size):
    config = ModelConfig.from_pretrained(demo_dir)
    held = config.num_local_experts // world_size
    inter, hidden = config.intermediate_size, config.hidden_size
    files = {}
    for rank in range(world_size):
        layer, bytes_read = load_layer(demo_dir, ParallelConfig(rank, world_size, "ep"))
        assert layer.w13.shape == (held, 2 * inter, hidden) and layer.w2.shape == (held, hidden, inter)
        gate_bytes = config.num_local_experts * hidden * 4
        assert bytes_read == gate_bytes + held * 3 * inter * hidden * 4, "read more than its own experts"
        reader = CheckpointReader(demo_dir)
        for e in range(held):
            name = f"{PREFIX}.experts.{rank * held + e}"
            filename = reader.weight_map[f"{name}.w1.weight"]
            f = files.setdefault(filename, safe_open(demo_dir / filename, framework="pt"))
            w13 = torch.cat([f.get_tensor(f"{name}.w1.weight"), f.get_tensor(f"{name}.w3.weight")])
            torch.testing.assert_close(layer.w13[e], w13, rtol=0, atol=0)
            torch.testing.assert_close(layer.w2[e], f.get_tensor(f"{name}.w2.weight"), rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("world_size", [2, 4])
def test_partial_outputs_sum_to_the_whole_layer(demo_dir, world_size, tokens):
    whole, _ = load_layer(demo_dir, ParallelConfig())
    hidden = hidden_states(ModelConfig.from_pretrained(demo_dir), tokens)
    partial = [load_layer(demo_dir, ParallelConfig(r, world_size, "ep"))[0] for r in range(world_size)]
    with torch.inference_mode():
        expected = whole(hidden)
        outputs = [layer(hidden) for layer in partial]
    torch.testing.assert_close(sum(outputs), expected, atol=1e-5, rtol=1e-5)
    if tokens == 1:
        # One token goes to K experts: a rank holding none of them adds nothing.
        _, chosen = route(hidden, whole.gate, whole.top_k)
        for rank, out in enumerate(outputs):
            owners = {e // (whole.w13.shape[0] // world_size) for e in chosen.flatten().tolist()}
            assert (rank in owners) == bool(out.abs().sum() > 0)


def test_grouped_path_skips_experts_held_elsewhere():
    generator = torch.Generator().manual_seed(0)
    experts, hidden_size, inter, top_k, world_size = 8, 16, 24, 2, 4
    w13 = torch.randn(experts, 2 * inter, hidden_size, generator=generator)
    w2 = torch.randn(experts, hidden_size, inter, generator=generator)
    hidden = torch.randn(9, hidden_size, generator=generator)
    weights, chosen = route(hidden, torch.randn(experts, hidden_size, generator=generator), top_k)
    held = experts // world_size
    parts = []
    for rank in range(world_size):
        local = held_expert_ids(chosen, rank * held, held)
        assert ((local == held) == ((chosen < rank * held) | (chosen >= (rank + 1) * held))).all()
        sl = slice(rank * held, (rank + 1) * held)
        parts.append(fused_moe(hidden, w13[sl], w2[sl], weights, local))
    torch.testing.assert_close(sum(parts), fused_moe(hidden, w13, w2, weights, chosen))


@pytest.mark.parametrize("mode", ["bitsandbytes", "bitsandbytes-nf4"])
def test_quantized_experts_split_by_expert(demo_dir, mode):
    """Each rank quantizes its whole experts exactly as one shard quantizes every expert."""
    quantization = QuantizationConfig(mode)
    whole, _ = load_layer(demo_dir, ParallelConfig(), quantization)
    partial = [load_layer(demo_dir, ParallelConfig(r, 2, "ep"), quantization)[0] for r in range(2)]
    assert [len(layer.quantized.w13) for layer in partial] == [4, 4]
    hidden = hidden_states(ModelConfig.from_pretrained(demo_dir), 5)
    with torch.inference_mode():
        torch.testing.assert_close(sum(layer(hidden) for layer in partial), whole(hidden), atol=1e-5, rtol=1e-5)


def test_experts_not_divisible_by_world_size_says_why(demo_dir):
    config = dataclasses.replace(ModelConfig.from_pretrained(demo_dir), num_local_experts=6)
    with pytest.raises(ValueError, match="num_local_experts = 6 is not divisible by 4"):
        ParallelConfig(0, 4, "ep").check(config)
    ParallelConfig(0, 4, "tp").check(config)
    odd = dataclasses.replace(config, intermediate_size=510, num_local_experts=8)
    ParallelConfig(0, 4, "ep").check(odd)  # whole experts: the intermediate size need not divide
    with pytest.raises(ValueError, match="intermediate_size = 510 is not divisible by 4"):
        ParallelConfig(0, 4, "tp").check(odd)
    with pytest.raises(ValueError, match="moe_parallel 'dp' is not one of tp, ep"):
        ParallelConfig(0, 1, "dp")


@pytest.mark.slow
def test_shard_refuses_ep_at_start_up(tmp_path):
    """A checkpoint with 6 experts on 4 shards: the shard exits with the reason before any rendezvous."""
    from mixserve.shards.demo.checkpoint import DemoConfig, write_demo_checkpoint

    model = write_demo_checkpoint(tmp_path / "six", DemoConfig(num_local_experts=6, num_hidden_layers=1))
    proc = subprocess.run(
        [PYTHON, "-m", "mixserve.cli", "shard", "--model", str(model), "--uds", str(tmp_path / "s")]
        + ["--moe-parallel", "ep"],
        env=subprocess_env(RANK="1", WORLD_SIZE="4"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "num_local_experts = 6 is not divisible by 4" in proc.stderr


def test_latency_report_sets_ep_against_tp():
    from mixserve.benchmarks.latency_report import latency_markdown

    def row(mode: str, batch: int, decode_ms: float, prefill_ms: float) -> dict:
        ms = {"p50": decode_ms, "p90": decode_ms}
        return {
            "moe_parallel": mode, "batch": batch, "seq_len": 256, "decode_tokens_per_expert": batch / 4,
            "prefill_tokens_per_expert": batch * 64.0, "prefill_ms": {"p50": prefill_ms, "p90": prefill_ms},
            "prefill_forward_ms": {"p50": prefill_ms}, "decode_ms": ms, "decode_forward_ms": ms,
            "prefill_tok_s": 1.0, "decode_tok_s": 1.0,
        }  # fmt: skip

    steps = [
        row("tp", 1, 10.0, 40.0),
        row("tp", 32, 80.0, 2000.0),
        row("ep", 1, 12.0, 80.0),
        row("ep", 32, 60.0, 1000.0),
    ]
    meta = {"date": "d", "commit": "c", "command": "x", "machine": {"cpu": "x", "cores": 2, "memory_gib": 1}}
    result = {"meta": meta, "config": {"num_shard": 2}, "steps": steps, "router": []}
    table = latency_markdown(result)
    assert "| 1 | 256 | 0.25 | 10.0 / 12.0 | 1.20 | 64 | 40.0 / 80.0 | 2.00 |" in table
    assert "| 32 | 256 | 8 | 80.0 / 60.0 | 0.75 | 2048 | 2000.0 / 1000.0 | 0.50 |" in table
    assert "decode tokens/expert" not in latency_markdown(dict(result, steps=steps[:2])), "one mode: no comparison"
