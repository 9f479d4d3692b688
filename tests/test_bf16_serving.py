"""Serving in bf16 on CPU through the router: two shards of the trained demo with `--dtype bfloat16`
answer greedy requests whose every token is the one torch bf16 in this process picks after the same
tokens, at >= 99 % of positions (teacher-forced: the server's tokens fed back one at a time)."""

import aiohttp
import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.demo.checkpoint import DemoConfig, ensure_demo_checkpoint
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.loader import load_model
from tests.test_bf16_kernels import TRAINED_DEMO_STEPS, _top1_after_each

CPU = torch.device("cpu")
PROMPTS = (
    "Once upon a time",
    "The little dog",
    "She opened the door and",
    "In the morning the",
    "The king said",
    "Tom and his sister",
)
NEW_TOKENS = 40  # 240 picks: the 99 % bound allows two


async def _greedy(url: str, prompt: str) -> tuple[list[int], list[int]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/tokenize", json={"inputs": prompt}) as response:
            prompt_ids = [token["id"] for token in await response.json()]
        parameters = {"max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": False}
        async with session.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}) as response:
            body = await response.json()
    return prompt_ids, [token["id"] for token in body["details"]["tokens"]]


@pytest.mark.slow
async def test_two_bf16_shards_pick_torch_bf16s_greedy_tokens(launch):
    model_dir = ensure_demo_checkpoint(DemoConfig(train_steps=TRAINED_DEMO_STEPS))
    # --cpu-tiles off reaches the shards (the demo's products are too small for AMX's tiles either way).
    server = launch("--model", str(model_dir), "--num-shard", "2", "--dtype", "bfloat16", "--cpu-tiles", "off")
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/info") as response:
        info = await response.json()
    assert info["model_dtype"] == "bfloat16"
    # The shards built the kernels on this machine, so they took the path this process takes.
    here = ops.kernels_report(ops.select("auto", CPU, torch.bfloat16, amx_tiles=False), torch.bfloat16)
    ops.select("auto", CPU, torch.float32)
    assert not here["amx_tile_products"]
    assert info["kernels"] == {**here, "backends": dict(sorted(here["backends"].items()))}
    answers = [await _greedy(server.url, prompt) for prompt in PROMPTS]
    startup = server.contract_log("the shard's documented event=dtype and event=ops start-up lines")
    assert "event=dtype rank=0 dtype=bfloat16 requested=bfloat16" in startup
    dot = str(here["bf16_dot_products"]).lower()
    assert f"dtype=bfloat16 vector_floats={here['vector_floats']} bf16_dot_products={dot}" in startup

    parallel = ParallelConfig()
    model = load_model(model_dir, parallel, TensorParallelGroup(parallel), dtype=torch.bfloat16)
    agree, total = torch_agreement(model, answers, torch.bfloat16, torch.bfloat16)
    assert agree / total >= 0.99, f"{agree} of {total} greedy tokens are torch bf16's"


def torch_agreement(
    model, answers: list[tuple[list[int], list[int]]], dtype: torch.dtype, kv_dtype: torch.dtype
) -> tuple[int, int]:
    """Of the served greedy tokens in `answers` (prompt ids, generated ids), how many are the token the torch
    reference (`model`, in `dtype`) picks after the same tokens (teacher-forced, over a KV cache of
    `kv_dtype`), and of how many."""
    cfg = model.config
    ops.select("torch", CPU, dtype)
    agree = total = 0
    with torch.inference_mode():
        for prompt_ids, generated in answers:
            sequence = torch.tensor([prompt_ids + generated])
            cache = KVCache(cfg.num_hidden_layers, 8, 16, cfg.num_key_value_heads, cfg.head_dim, kv_dtype, CPU)
            picks = _top1_after_each(model, cache, sequence, sequence.shape[1])[:, 0]  # [L]
            expected = picks[len(prompt_ids) - 1 : -1]  # the picks after the prompt and each generated token
            agree += int((expected == torch.tensor(generated)).sum())
            total += len(generated)
    ops.select("auto", CPU, torch.float32)
    return agree, total
