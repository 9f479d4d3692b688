"""`--load-format dummy`: random weights of the checkpoint's shapes from config.json alone, the same
slices a real checkpoint gives each rank, and a server launched on them."""

import json
import shutil

import aiohttp
import pytest
import torch

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def config_only_dir(demo_dir, tmp_path_factory):
    """The demo checkpoint's config.json and tokenizer files, without its weights."""
    out = tmp_path_factory.mktemp("config-only")
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(demo_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def small_config(demo_dir) -> dict:
    """The demo's config.json at smaller shapes (no checkpoint has them: dummy weights only)."""
    config = json.loads((demo_dir / "config.json").read_text())
    small = dict(hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4, num_key_value_heads=2)
    return {**config, **small, "vocab_size": 512}


def write_config(directory, config: dict):
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def load(model_dir, rank=0, world_size=1, **kwargs):
    parallel = ParallelConfig(rank, world_size)
    return load_model(model_dir, parallel, TensorParallelGroup(parallel), **kwargs)


@pytest.mark.parametrize("world_size", [1, 2])
def test_dummy_slices_have_a_real_checkpoints_shapes_and_dtypes(demo_dir, config_only_dir, world_size):
    for rank in range(world_size):
        real = load(demo_dir, rank, world_size, dtype=torch.bfloat16)
        dummy = load(config_only_dir, rank, world_size, dtype=torch.bfloat16, load_format="dummy")
        expected = {name: (p.shape, p.dtype) for name, p in real.named_parameters()}
        assert {name: (p.shape, p.dtype) for name, p in dummy.named_parameters()} == expected


def test_dummy_weights_are_seeded_and_sliced_from_one_full_tensor(small_config, tmp_path):
    model_dir = write_config(tmp_path, small_config)
    first, again = (load(model_dir, load_format="dummy", seed=7) for _ in range(2))
    other = load(model_dir, load_format="dummy", seed=8)
    for (name, p), q, r in zip(first.named_parameters(), again.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q)
        if "norm" in name:
            assert bool((p == 1).all())
        else:
            assert not torch.equal(p, r), name
            assert p.float().std().item() == pytest.approx(0.02, rel=0.3)
    half = load(model_dir, 1, 2, load_format="dummy", seed=7)
    rows = half.layers[0].block_sparse_moe.w2.shape[2]
    torch.testing.assert_close(half.layers[0].block_sparse_moe.w2, first.layers[0].block_sparse_moe.w2[:, :, rows:])


def test_dummy_load_reads_only_the_config(config_only_dir):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(config_only_dir)
    with pytest.raises(ValueError, match="load_format"):
        load(config_only_dir, load_format="npz")


def test_activations_stay_finite_through_32_layers(small_config, tmp_path):
    model_dir = write_config(tmp_path, {**small_config, "num_hidden_layers": 32})
    model = load(model_dir, dtype=torch.bfloat16, load_format="dummy")
    parallel = ParallelConfig()
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.bfloat16, 4)
    runner.allocate_cache(8)
    tokens = list(range(3, 19))
    step = SequenceStep(0, tokens, 0, list(range(16)), [0, 1, 2, 3], True, SamplingParams(temperature=0.0))
    logits = runner.forward([step])
    assert bool(torch.isfinite(logits).all()) and logits.abs().max() > 0


@pytest.mark.slow
async def test_server_on_dummy_weights_answers_and_reports_its_memory(launch, config_only_dir):
    # The directory holds no weights: that the shards serve at all is their dummy load.
    server = launch("--model", str(config_only_dir), "--num-shard", "2", "--load-format", "dummy")
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "The old river runs", "max_new_tokens": 5, "temperature": 0, "stream": False}
        async with session.post(f"{server.url}/predict", json=body) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["generated_tokens"] >= 1
        async with session.get(f"{server.url}/info") as response:
            info = await response.json()
    assert info["weights"] == "random"
    memory = info["memory"]
    assert memory["kv_cache_bytes"] == info["kv_blocks_total"] * memory["block_bytes"]
    assert memory["weight_bytes"] == info["weight_bytes_per_shard"] > 0
    assert memory["peak_activation_bytes"] == 0  # CPU: the worst-case steps are not run
    assert memory["free_bytes"] >= memory["kv_cache_bytes"]
    assert memory["max_context_tokens"] == info["max_total_tokens"]
    assert memory["max_batch_size"] == info["max_batch_size"]
