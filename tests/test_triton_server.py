"""Greedy outputs through the router with the Triton kernels (`--kernels triton`: on CPU the shards run
them in Triton's interpreter, which each shard turns on itself) equal the torch path's, on 1 and 2
shards, the 2-shard servers' decode steps through the decode graph runner's static buffers
(`--cuda-graphs eager`: the step CUDA graphs capture, with Triton's fused MoE and decode attention).

A tiny checkpoint keeps the interpreter's ~20-30 ms a kernel program affordable: 2 layers, head dim 16,
4 experts; three prompts of 8 new tokens, sent together so decode steps batch them."""

import asyncio

import aiohttp
import pytest

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
PROMPTS = ["The river", "Once upon a time there was a small boat", "Numbers: 1, 2, 3"]


async def greedy_ids(url: str) -> list[list[int]]:
    """Each prompt's generated token ids (TGI /generate with details), the prompts sent at once."""

    async def generate(session: aiohttp.ClientSession, prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
        async with session.post(f"{url}/generate", json=body) as response:
            assert response.status == 200, await response.text()
            return [token["id"] for token in (await response.json())["details"]["tokens"]]

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(generate(session, p) for p in PROMPTS))


@pytest.mark.parametrize(("num_shard", "graphs"), [("1", "off"), ("2", "eager")])
async def test_triton_kernels_serve_the_torch_paths_greedy_tokens(launch, interpreter_dir, num_shard, graphs):
    common = ("--model", str(interpreter_dir), "--num-shard", num_shard, "--cuda-graphs", graphs)
    # A warm-up measures the largest batch at the longest context: small limits keep it quick interpreted.
    common += ("--max-batch-size", "4", "--max-total-tokens", "64", "--max-batch-prefill-tokens", "64")
    common += ("--max-kv-blocks", "64")
    by_torch = launch(*common, "--kernels", "torch")
    by_triton = launch(*common, "--kernels", "triton")
    expected = await greedy_ids(by_torch.url)
    assert [len(ids) for ids in expected] == [NEW_TOKENS] * len(PROMPTS)
    assert await greedy_ids(by_triton.url) == expected
    # Which implementation each op runs is what each shard's start-up lines say (docs/configuration.md).
    log = by_triton.contract_log("the shards' documented start-up lines: event=ops, kernel_fallback, decode_graphs")
    for op in (
        "rms_norm",
        "rotary_write_kv",
        "paged_decode_attention",
        "paged_prefill_attention",
        "topk_softmax",
        "fused_moe",
    ):
        assert log.count(f"{op}=triton") == int(num_shard), op
    assert "event=kernel_fallback" not in log
    if graphs == "eager":
        assert "event=decode_graphs captured=False" in log
    by_torch.stop()
    by_triton.stop()
