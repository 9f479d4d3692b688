"""A whole decode step in one C call (the `causal_lm` op's CPU path: decoder_stack with the model's ends,
shards/kernels/stack_ends.c): the embedding, every layer, the final norm, the LM head and the greedy
statistics give the same logits, statistics and KV writes, bit for bit, as the embedding, the stack and
the separate norm, LM head and statistics ops, in fp32, bf16 and int8-wo; rows past the LM head
kernel's cap take the separate ops; a row holding NaN gives NaN statistics, which parallel greedy turns
into its fallback; a row outside the step is refused. Across ranks (the embedding's all-reduce in C) it
runs in tests/test_model_parallel.py's groups, against transformers."""

import pytest
import torch
from test_decoder_stack import BLOCK, decode_step, random_cache

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels import decoder_layer, decoder_stack, linear
from mixserve.shards.loader import load_model
from mixserve.shards.ops import cpu_layers
from mixserve.shards.parallel_greedy import combine_stats, slice_stats
from mixserve.shards.quant.config import QuantizationConfig

pytestmark = pytest.mark.usefixtures("decoder_layer_kernel")

VARIANTS = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8-wo-bf16": (torch.bfloat16, QuantizationConfig("int8-wo")),
}


def load(demo_dir, dtype: torch.dtype, quantization: QuantizationConfig | None = None):
    ops.select("auto", torch.device("cpu"), dtype)
    parallel = ParallelConfig()
    return load_model(demo_dir, parallel, TensorParallelGroup(parallel), dtype, quantization=quantization)


def counted_runs(monkeypatch) -> list[bool]:
    """Whether each decoder_stack.run call had ends."""
    runs, real = [], decoder_stack.run
    monkeypatch.setattr(decoder_stack, "run", lambda *a: runs.append(len(a) > 3 and a[3] is not None) or real(*a))
    return runs


def run_both(model, monkeypatch, contexts: list[int], rows: torch.Tensor | None):
    """(logits, statistics, pools) of one decode step through the ends in C and through the separate ops."""
    cfg = model.config
    meta, positions = decode_step(contexts)
    tokens = torch.tensor([(7 * i + 5) % cfg.vocab_size for i in range(len(contexts))])
    count = len(contexts) if rows is None else rows.shape[0]
    results = {}
    for ends in (True, False):
        if not ends:
            monkeypatch.setattr(model, "kernel_ends", lambda: None)
        kv = random_cache(cfg, model.embed_tokens.weight.dtype)
        stats = torch.empty(count, 3, dtype=torch.float64)
        with torch.inference_mode():
            logits = model(tokens, positions, kv, meta, rows, gather_logits=False, greedy_stats=stats)
        pools = [pool.clone() for i in range(cfg.num_hidden_layers) for pool in kv.layer(i)]
        results[ends] = (logits, stats, pools)
    return results


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [None, [2, 0]], ids=["every-row", "rows-asked"])
def test_the_ends_give_the_separate_ops_results_bit_for_bit(demo_dir, monkeypatch, variant, rows):
    model = load(demo_dir, *VARIANTS[variant])
    runs = counted_runs(monkeypatch)
    asked = None if rows is None else torch.tensor(rows)
    results = run_both(model, monkeypatch, [7, 3, 12], asked)
    assert runs == [True, False], "the step must take the ends in C, and only with them allowed"
    (logits, stats, pools), (expected, expected_stats, expected_pools) = results[True], results[False]
    assert logits.dtype is torch.float32 and logits.shape == (3 if rows is None else 2, model.lm_head.rows_per_rank)
    assert torch.equal(logits, expected)
    assert torch.equal(stats, expected_stats)
    head = model.lm_head
    assert torch.equal(stats, slice_stats(logits, head.vocab_start, head.vocab_size))
    assert all(torch.equal(a, b) for a, b in zip(pools, expected_pools, strict=True))
    if model.embed_tokens.weight.dtype is torch.bfloat16:  # the logits keep the LM head's bf16 rounding
        assert torch.equal(logits, logits.bfloat16().float())


def test_rows_past_the_head_kernels_cap_take_the_separate_ops(demo_dir, monkeypatch):
    model = load(demo_dir, torch.float32)
    runs = counted_runs(monkeypatch)
    contexts = [3 + i % 2 for i in range(linear.MAX_ROWS + 1)]  # a block each
    attention, experts = model.layers[0].kernel_halves()
    _, heads, _, head_dim = attention.shape_key
    assert decoder_layer.fits(len(contexts), heads, head_dim, BLOCK, experts.shape_key[0])
    results = run_both(model, monkeypatch, contexts, None)
    assert runs == [False, False], "the LM head past its kernel's rows runs in torch, so the stack has no ends"
    assert torch.equal(results[True][0], results[False][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_within_a_measured_head_cap_take_the_ends_in_c(demo_dir, monkeypatch, dtype):
    """Past the build's 16 rows, within a cap measured at warm-up (shards/head_rows.py), the step keeps
    its one C call, with the separate ops' results bit for bit."""
    model = load(demo_dir, dtype)
    runs = counted_runs(monkeypatch)
    contexts = [3 + i % 2 for i in range(linear.MAX_ROWS + 4)]  # a block each
    linear.set_measured_rows(2 * linear.MAX_ROWS)
    try:
        results = run_both(model, monkeypatch, contexts, None)
    finally:
        linear.set_measured_rows(None)
    assert runs == [True, False]
    (logits, stats, pools), (expected, expected_stats, expected_pools) = results[True], results[False]
    assert torch.equal(logits, expected) and torch.equal(stats, expected_stats)
    assert all(torch.equal(a, b) for a, b in zip(pools, expected_pools, strict=True))


def test_a_row_holding_nan_gives_nan_statistics_and_no_greedy_choice(demo_dir):
    model = load(demo_dir, torch.float32)
    model.kernel_ends()  # the ends read the norm's weight in place from here on
    meta, positions = decode_step([5, 9])
    with torch.no_grad():
        model.norm.weight[3] = float("nan")
    stats = torch.empty(2, 3, dtype=torch.float64)
    with torch.inference_mode():
        logits = model(
            torch.tensor([4, 8]), positions, random_cache(model.config, torch.float32), meta, None, False, stats
        )
    assert logits.isnan().all()
    assert stats.isnan().all()
    assert combine_stats(stats, model.lm_head.group) is None


def test_rows_outside_the_step_and_a_token_count_not_the_steps_are_refused(demo_dir):
    model = load(demo_dir, torch.float32)
    ends, halves = model.kernel_ends(), model.layers[0].kernel_halves()
    meta, positions = decode_step([5, 9])
    kv = random_cache(model.config, torch.float32)
    hidden = torch.empty(2, model.config.hidden_size)
    step = decoder_layer.prepare_step(hidden, positions, meta, kv.layer(0), *halves)
    stack, shm = cpu_layers._stack(model.layers, kv, step)
    logits = torch.empty(1, ends.vocab_rows)
    with pytest.raises(ValueError, match="head refused its rows"):
        decoder_stack.run(step, stack, shm, ends.step(torch.tensor([4, 8]), torch.tensor([2]), logits, None))
    with pytest.raises(ValueError, match="do not fit the step's 2 tokens"):
        decoder_stack.run(step, stack, shm, ends.step(torch.tensor([4, 8, 1]), torch.tensor([0]), logits, None))
    with pytest.raises(ValueError, match="logits rows and rows asked for"):
        ends.step(torch.tensor([4, 8]), None, logits, None)
