"""`--kv-cache-dtype`: the flag's resolution, a bf16 KV cache under an fp32 model on CPU (the ops store K/V
rounded to bf16 and read them widened; the kernels and the torch reference pick the same tokens), and two
served shards of the trained demo holding one: half the block bytes, and greedy tokens that are the ones torch
fp32 over a bf16 cache picks after the same tokens."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.demo.checkpoint import DemoConfig, ensure_demo_checkpoint
from mixserve.shards.devices import DeviceUnavailable, resolve_kv_cache_dtype
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.loader import load_model
from mixserve.shards.ops import reference
from mixserve.shards.preflight import answer
from tests.launched_server import get_json
from tests.test_bf16_kernels import TRAINED_DEMO_STEPS, _top1_after_each, prompt_rows
from tests.test_bf16_serving import PROMPTS, _greedy, torch_agreement

CPU = torch.device("cpu")
F32, BF16 = torch.float32, torch.bfloat16


def test_auto_is_the_models_dtype_and_a_cpu_takes_either():
    assert resolve_kv_cache_dtype("auto", F32, CPU) is F32
    assert resolve_kv_cache_dtype("auto", BF16, CPU) is BF16
    assert resolve_kv_cache_dtype("bfloat16", F32, CPU) is BF16
    assert resolve_kv_cache_dtype("float32", BF16, CPU) is F32


def test_a_gpu_keeps_the_models_dtype_and_other_names_are_refused():
    cuda = torch.device("cuda", 0)  # only its type is read: no GPU needed
    assert resolve_kv_cache_dtype("bfloat16", BF16, cuda) is BF16
    with pytest.raises(DeviceUnavailable, match="on a GPU the KV cache holds the model's dtype"):
        resolve_kv_cache_dtype("float32", BF16, cuda)
    with pytest.raises(DeviceUnavailable, match="not one of auto, float32, bfloat16"):
        resolve_kv_cache_dtype("fp8", F32, CPU)


def test_the_host_check_refuses_what_the_shards_would():
    found = answer(["--device", "cpu", "--kv-cache-dtype", "float16"])
    assert not found["ok"] and "--kv-cache-dtype float16" in found["error"]
    assert answer(["--device", "cpu", "--dtype", "float32", "--kv-cache-dtype", "bfloat16"])["ok"]


def test_the_reference_ops_store_rounded_and_read_widened():
    gen = torch.Generator().manual_seed(0)
    pools = tuple(torch.zeros(4, 16, 2, 32, dtype=BF16) for _ in range(2))
    k, v = torch.randn(50, 2, 32, generator=gen), torch.randn(50, 2, 32, generator=gen)
    tables = torch.tensor([[2, 0, 3, 1]])
    slots = (tables[0].repeat_interleave(16) * 16 + torch.arange(64) % 16)[:50]
    reference.write_kv(pools, slots, k, v)
    assert torch.equal(pools[0].view(-1, 2, 32)[slots], k.to(BF16))
    assert torch.equal(pools[1].view(-1, 2, 32)[slots], v.to(BF16))
    widened = tuple(pool.float() for pool in pools)
    q, lens = torch.randn(1, 4, 32, generator=gen), torch.tensor([50])
    decode = reference.paged_decode_attention(q, pools, tables, lens, 0.2)
    assert decode.dtype is F32 and torch.equal(decode, reference.paged_decode_attention(q, widened, tables, lens, 0.2))
    q, starts, begins = torch.randn(10, 4, 32, generator=gen), torch.tensor([0, 10]), torch.tensor([40])
    prefill = reference.paged_prefill_attention(q, pools, starts, begins, tables, 0.2)
    assert torch.equal(prefill, reference.paged_prefill_attention(q, widened, starts, begins, tables, 0.2))


def test_an_fp32_model_over_a_bf16_cache_picks_the_same_tokens_in_the_kernels_as_in_torch(demo_tokenizer):
    """The trained demo in fp32 over a bf16 cache: teacher-forced on torch's greedy continuations of four
    prompts, the kernels (decoder layers in C, storing K/V rounded to bf16 and reading them in place) pick
    torch's token at >= 99 % of positions; fp32 both, they differ only in the order of sums."""
    parallel = ParallelConfig()
    model_dir = ensure_demo_checkpoint(DemoConfig(train_steps=TRAINED_DEMO_STEPS))
    model = load_model(model_dir, parallel, TensorParallelGroup(parallel), dtype=F32)
    cfg = model.config
    sequences, prompt_len, length = prompt_rows(demo_tokenizer)
    caches = []

    def cache() -> KVCache:
        caches.append(KVCache(cfg.num_hidden_layers, 64, 16, cfg.num_key_value_heads, cfg.head_dim, BF16, CPU))
        return caches[-1]

    with torch.inference_mode():
        ops.select("torch", CPU, F32)
        expected = _top1_after_each(model, cache(), sequences, prompt_len)
        chosen = ops.select("native", CPU, F32)
        got = _top1_after_each(model, cache(), sequences.clone(), length)
    ops.select("auto", CPU, F32)
    assert chosen.backends["decoder_layers"] == "native"
    assert all(pool.dtype is BF16 and pool.abs().sum() > 0 for kv in caches for pool in (kv.keys, kv.values))
    agreement = (got == expected).float().mean().item()
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"


@pytest.mark.slow
async def test_two_fp32_shards_over_a_bf16_cache_pick_torchs_greedy_tokens(launch):
    model_dir = ensure_demo_checkpoint(DemoConfig(train_steps=TRAINED_DEMO_STEPS))
    server = launch("--model", str(model_dir), "--num-shard", "2", "--dtype", "float32", "--kv-cache-dtype", "bfloat16")
    info = get_json(f"{server.url}/info")
    parallel = ParallelConfig()
    model = load_model(model_dir, parallel, TensorParallelGroup(parallel), dtype=F32)
    cfg = model.config
    assert info["model_dtype"] == "float32" and info["kv_cache_dtype"] == "bfloat16"
    # Both K and V of every layer, a shard's half of the KV heads, two bytes an element.
    half_the_heads = cfg.num_key_value_heads // 2
    assert info["memory"]["block_bytes"] == 2 * cfg.num_hidden_layers * 16 * half_the_heads * cfg.head_dim * 2
    answers = [await _greedy(server.url, prompt) for prompt in PROMPTS]
    startup = server.contract_log("the shard's documented event=dtype start-up line")
    assert "event=dtype rank=0 dtype=float32 requested=float32 kv_cache_dtype=bfloat16" in startup

    agree, total = torch_agreement(model, answers, F32, BF16)
    assert agree / total >= 0.99, f"{agree} of {total} greedy tokens are torch fp32's over a bf16 cache"
