"""A step past the decoder layer kernel's measured cap, run in the kernel in tiles of the cap, one after
another (Ops.decoder_layers_tiles): the same logits, greedy statistics and KV writes as the whole step
in one kernel call, through the one-C-call path (causal_lm with the model's ends: rows asked out of
token order, rows of a scored prompt, a tile asking no row) and through the layers' path
(decoder_layers), in fp32 and bf16; the warm-up's choice of tiles from its timings."""

import pytest
import torch
from test_decoder_stack import NUM_BLOCKS, random_cache

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernel_tokens import MARGIN, choose_tiles
from mixserve.shards.kernels import decoder_stack, moe
from mixserve.shards.loader import load_model
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.step_inputs import step_inputs

BLOCK = 4
TILE = 8


def test_tiles_where_the_kernel_kept_the_top_size_and_torch_was_clearly_slower_there():
    ahead = [(128, 1.0, 2.0), (256, 1.0, 1.0 / MARGIN * 1.01)]
    assert choose_tiles(ahead, 256, 256)
    assert not choose_tiles([(128, 1.0, 2.0), (256, 1.0, 1.0)], 256, 256)  # level at the top: torch's one call
    assert not choose_tiles(ahead, 128, 256)  # capped below the top
    assert not choose_tiles(ahead[:1], 256, 256)  # the top never timed (the router's steps are smaller)
    assert not choose_tiles([], 256, 256)


def sequence(seq_id: int, start: int, count: int, first_block: int, vocab: int, **kw) -> SequenceStep:
    """`count` tokens from position `start` of a sequence on blocks first_block, first_block + 1, ..."""
    end = start + count
    table = list(range(first_block, first_block + -(-end // BLOCK)))
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
    tokens = [(seq_id * 31 + p * 7) % vocab for p in range(start, end)]
    return SequenceStep(seq_id, tokens, start, slots, table, True, SamplingParams(temperature=0.0), **kw)


def mixed_step(vocab: int, prompt_logprobs: bool) -> list[SequenceStep]:
    """41 tokens: a 21-token prefill chunk at position 6 given first (its rows: one, or one per token when
    it scores its prompt), three decodes and a 17-token chunk. Decodes go first in the step's tokens,
    so the rows asked are not in token order; over tiles of 8 (tokens 0-7, 8-15, ..., 40) the second,
    fourth and fifth ask no row unless the chunk scores its prompt."""
    return [
        sequence(0, 6, 21, 0, vocab, prompt_logprobs=prompt_logprobs),
        sequence(1, 9, 1, 7, vocab),
        sequence(2, 18, 1, 10, vocab),
        sequence(3, 4, 17, 15, vocab),
        sequence(4, 9, 1, 21, vocab),
    ]


def run(model, steps, tiles: bool | None, dtype: torch.dtype, kernel_calls: list[int]):
    """(logits, greedy statistics, pools) of the step with the cap at TILE, in tiles (True) or not at all
    (False: torch) or, with the cap at the kernel's top size, in one call (None); and how many kernel calls
    ran."""
    cap = TILE if tiles is not None else moe.TIMED_MAX_TOKENS
    ops.set_decoder_layer_tokens(cap, bool(tiles))
    moe.set_measured_cap(cap)
    kernel_calls.clear()
    inputs = step_inputs(steps, BLOCK, torch.device("cpu"), ops.current().per_token_max, score=True)
    kv = random_cache(model.config, dtype)
    rows = inputs.logits_indices
    stats = torch.empty(rows.shape[0], 3, dtype=torch.float64)
    with torch.inference_mode():
        logits = model(inputs.token_ids, inputs.positions, kv, inputs.meta, rows, False, stats)
    pools = [pool.clone() for i in range(model.config.num_hidden_layers) for pool in kv.layer(i)]
    return logits, stats, pools, len(kernel_calls)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = decoder_stack.run
    monkeypatch.setattr(decoder_stack, "run", lambda *a: calls.append(1) or real(*a))
    yield calls
    moe.set_measured_cap(None)


@pytest.mark.parametrize("ends", [True, False], ids=["one-call", "layers"])
@pytest.mark.parametrize("prompt_logprobs", [False, True], ids=["last-rows", "scored-prompt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_in_tiles_gives_the_whole_step_s_results(
    decoder_layer_kernel, demo_dir, monkeypatch, kernel_calls, dtype, prompt_logprobs, ends
):
    ops.select("auto", torch.device("cpu"), dtype)
    try:
        parallel = ParallelConfig()
        model = load_model(demo_dir, parallel, TensorParallelGroup(parallel), dtype)
        if not ends:
            monkeypatch.setattr(model, "kernel_ends", lambda: None)
        steps = mixed_step(model.config.vocab_size, prompt_logprobs)
        blocks = [block for s in steps for block in s.block_table]
        assert len(set(blocks)) == len(blocks) and max(blocks) < NUM_BLOCKS  # no sequence reads another's
        whole = run(model, steps, None, dtype, kernel_calls)
        tiled = run(model, steps, True, dtype, kernel_calls)
        untiled = run(model, steps, False, dtype, kernel_calls)
    finally:
        ops.select("auto", torch.device("cpu"), torch.float32)
    assert (whole[3], tiled[3], untiled[3]) == (1, 6, 0)  # 41 tokens: five tiles of 8 and one; torch's layers
    # A tile's LM head call has fewer rows than the whole step's: with every prompt row scored, the head's
    # path for its row count (and the order of its sums) may differ, by a bf16 rounding in bf16; the layers
    # and their KV writes are the same bit for bit.
    exact = {"atol": 0, "rtol": 0}
    if prompt_logprobs:
        exact = {"atol": 1e-5, "rtol": 1e-5} if dtype is torch.float32 else {"atol": 4e-3, "rtol": 1e-2}
    torch.testing.assert_close(tiled[0], whole[0], **exact)
    if ends:
        torch.testing.assert_close(tiled[1], whole[1], **exact)
        assert torch.equal(tiled[1][:, 1], whole[1][:, 1])  # the same greedy token
    assert all(torch.equal(a, b) for a, b in zip(tiled[2], whole[2], strict=True))
    # Against torch's layers: fp32 to rounding; bf16 rounds its residual stream at every op there, which the
    # kernel keeps in fp32, so only the logits as a whole are compared.
    if dtype is torch.float32:
        torch.testing.assert_close(tiled[0], untiled[0], atol=1e-4, rtol=1e-4)
    else:
        assert (tiled[0] - untiled[0]).norm() / untiled[0].norm() < 0.1


def test_the_runner_builds_per_token_tables_for_every_step_where_tiles_run(decoder_layer_kernel):
    steps = mixed_step(100, False)
    tables = {}
    for tiles in (False, True):
        ops.set_decoder_layer_tokens(TILE, tiles)
        try:
            tables[tiles] = step_inputs(steps, BLOCK, torch.device("cpu"), ops.current().per_token_max).meta
        finally:
            ops.select("auto", torch.device("cpu"), torch.float32)
    assert tables[False].token_block_tables is None
    meta = tables[True]
    assert meta.token_block_tables.shape[0] == 41
    # Tokens 16-31: the last 8 of the 21-token chunk (positions 19-26), then the first 8 of the 17-token one
    # (positions 4-11); each keeps its sequence's table and its position + 1 as its context.
    tile_tables, tile_lens = meta.tokens(16, 32).per_token()
    assert tile_lens.tolist() == list(range(20, 28)) + list(range(5, 13))
    width = tile_tables.shape[1]
    first, second = steps[0].block_table, steps[3].block_table
    assert tile_tables.tolist() == [first + [0] * (width - len(first))] * 8 + [second + [0] * (width - len(second))] * 8
    assert meta.tokens(16, 32).slot_mapping.tolist() == meta.slot_mapping[16:32].tolist()
