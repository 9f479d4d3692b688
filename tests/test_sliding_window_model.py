"""A Mixtral with a sliding window (the demo's weights, `sliding_window` set in its config) against
transformers' MixtralForCausalLM: a prompt prefilled in two chunks longer than the window, every position's
logits, through the torch reference ops, the C ops one by one (the C prefill attention) and the C
decoder-layer kernel (each chunk's rows in tiles), then decode steps through the kernel."""

import json
import shutil

import pytest
import torch
from transformers import MixtralForCausalLM as ReferenceMixtral

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.loader import load_model

CPU = torch.device("cpu")
WINDOW = 24
BLOCK = 16
CHUNKS = ((0, 48), (48, 52))  # (start, tokens): both past the window, the second across it several times
PROMPT = sum(n for _, n in CHUNKS)


@pytest.fixture(scope="module")
def window_dir(demo_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("window") / "model"
    shutil.copytree(demo_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["sliding_window"] = WINDOW
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def expected(window_dir):
    """transformers' logits of every position of the prompt, and its greedy continuation's."""
    reference = ReferenceMixtral.from_pretrained(window_dir, dtype=torch.float32).eval()
    prompt = torch.randint(3, reference.config.vocab_size, (1, PROMPT), generator=_gen())
    with torch.inference_mode():
        out = reference.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
        logits = reference(out).logits[0]  # [positions, V]
    return out[0], logits


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _chunk_meta(table: torch.Tensor, start: int, tokens: int, per_token: bool) -> AttentionMetadata:
    positions = torch.arange(start, start + tokens)
    meta = AttentionMetadata(
        slot_mapping=table[positions // BLOCK] * BLOCK + positions % BLOCK,
        prefill_query_start=torch.tensor([0, tokens], dtype=torch.int32),
        prefill_start_positions=torch.tensor([start], dtype=torch.int32),
        prefill_block_tables=table.unsqueeze(0).to(torch.int32),
        prefill_chunks=[(tokens, start)],
    )
    if per_token:  # the decoder-layer kernel's form: every row a query over its table
        meta.token_block_tables = table.repeat(tokens, 1)
        meta.token_context_lens = positions + 1
    return meta


@pytest.mark.parametrize("path", ["torch", "c-ops", "c-layers"])
def test_window_logits_equal_transformers(window_dir, expected, kernel_layers, path):
    tokens, reference_logits = expected
    if path == "torch":
        chosen = ops.select("torch", CPU, torch.float32)
    else:
        chosen = ops.select("native", CPU, torch.float32)
        if path == "c-layers" and chosen.backends["decoder_layers"] != "native":
            pytest.skip("the decoder layer kernel does not build here")
    try:
        parallel = ParallelConfig()
        model = load_model(window_dir, parallel, TensorParallelGroup(parallel))
        cfg = model.config
        assert cfg.sliding_window == WINDOW
        width = -(-len(tokens) // BLOCK)
        cache = KVCache(
            cfg.num_hidden_layers, 2 * width, BLOCK, cfg.num_key_value_heads, cfg.head_dim, torch.float32, CPU
        )
        table = torch.randperm(2 * width, generator=_gen())[:width]
        got = []
        with torch.inference_mode():
            for start, n in CHUNKS:
                meta = _chunk_meta(table, start, n, per_token=path == "c-layers")
                positions = torch.arange(start, start + n)
                got.append(model(tokens[start : start + n], positions, cache, meta, torch.arange(n)))
            # Decode steps: one query at a time over its window, through the kernel on the C paths.
            for position in range(PROMPT, len(tokens) - 1):
                meta = AttentionMetadata(
                    slot_mapping=table[position // BLOCK : position // BLOCK + 1] * BLOCK + position % BLOCK,
                    num_decode_tokens=1,
                    decode_block_tables=table.unsqueeze(0),
                    decode_context_lens=torch.tensor([position + 1]),
                )
                got.append(
                    model(tokens[position : position + 1], torch.tensor([position]), cache, meta, torch.arange(1))
                )
    finally:
        ops.select("auto", CPU, torch.float32)
    torch.testing.assert_close(torch.cat(got), reference_logits[:-1], atol=2e-5, rtol=1e-4)
    if path == "c-layers":
        assert len(kernel_layers) >= 2 * cfg.num_hidden_layers
