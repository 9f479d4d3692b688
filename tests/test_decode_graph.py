"""The decode graph runner's static-buffer path, run eagerly on the CPU (`--cuda-graphs eager`): the
same logits and tokens as the plain forward, padding rows kept off the router's blocks, and a decode
step with no host sync (under a dispatch-mode check, and compiled whole by torch.compile)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixserve.router import speculation
from mixserve.shards import decode_graph, ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.config import ParallelConfig
from mixserve.shards.decode_graph import DecodeGraphRunner, buckets
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.memory import StepLimits, size_kv_cache
from mixserve.shards.multi_step import decode_steps
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

CPU = torch.device("cpu")

BLOCK = 4
BLOCKS = 40
GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[1, 523, 77, 1200, 9], [1, 88, 2900, 15, 16, 17, 18, 19, 20], [1, 4000]]
SAMPLING = [GREEDY, SamplingParams(temperature=0.9, top_k=50, seed=11), SamplingParams(temperature=1.2, seed=5)]
# Ops that read a device tensor back to the host (or size their output from its values).
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "_unique2", "unique_consecutive"}


@pytest.fixture(scope="module")
def model(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    return load_model(demo_dir, parallel, TensorParallelGroup(parallel))


@pytest.fixture(params=["auto", "torch"])
def kernels(request):
    ops.select(request.param, CPU, torch.float32)
    yield request.param
    ops.select("auto", CPU, torch.float32)


def warm_runner(model, mode: str, max_batch: int = 8, max_graph_rows: int = 0) -> ModelRunner:
    parallel = ParallelConfig()
    runner = ModelRunner(
        model, parallel, TensorParallelGroup(parallel), CPU, torch.float32, BLOCK, mode, max_graph_rows
    )
    assert size_kv_cache(runner, StepLimits(32, max_batch, 128), 0, BLOCKS, 1 << 30).num_blocks == BLOCKS
    return runner


def table(seq: int) -> list[int]:
    return list(range(seq * 8, seq * 8 + 8))


def step(seq: int, tokens: list[int], start: int) -> SequenceStep:
    slots = [table(seq)[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + len(tokens))]
    return SequenceStep(seq, tokens, start, slots, table(seq), True, SAMPLING[seq])


def decode_after_prefill(runner: ModelRunner) -> list[SequenceStep]:
    results = runner.step([step(i, p, 0) for i, p in enumerate(PROMPTS)])
    return [step(r.seq_id, [r.token_id], len(PROMPTS[r.seq_id])) for r in results]


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="positive"):
        buckets(0)
    with pytest.raises(ValueError, match="cuda graphs"):
        decode_graph.wanted("on", torch.device("cpu"), False)
    assert not decode_graph.wanted("auto", torch.device("cpu"), False)
    assert not decode_graph.wanted("auto", torch.device("cuda"), True)
    assert decode_graph.wanted("auto", torch.device("cuda"), False)


def test_warmup_reserves_a_scratch_block_the_router_cannot_address(model):
    runner = warm_runner(model, "eager")
    assert runner.kv_cache.num_blocks == BLOCKS and runner.kv_cache.keys.shape[1] == BLOCKS + 1
    # Rows up to the widest verification (decode_graph.VERIFY_ROWS, the router's) though the batch is 8.
    assert decode_graph.VERIFY_ROWS == speculation.VERIFY_ROWS
    assert runner.decode_graphs.scratch_block == BLOCKS and runner.decode_graphs.buckets == [1, 2, 4, 8, 16, 32]
    assert warm_runner(model, "eager", max_graph_rows=8).decode_graphs.buckets == [1, 2, 4, 8]
    assert warm_runner(model, "off").kv_cache.keys.shape[1] == BLOCKS


def test_static_path_gives_the_plain_logits_and_keeps_padding_off_router_blocks(model, kernels):
    plain, static = warm_runner(model, "off"), warm_runner(model, "eager")
    decodes = decode_after_prefill(plain)
    assert decode_after_prefill(static) == decodes
    assert static.decode_graphs.fits(decodes)
    before = static.kv_cache.keys.clone(), static.kv_cache.values.clone()
    expected = plain.forward(decodes)
    got = static.forward(decodes)  # 3 sequences in bucket 4: one padding row
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.kv_cache.keys[:, :BLOCKS], plain.kv_cache.keys[:, :BLOCKS])
    for pool, old in zip((static.kv_cache.keys, static.kv_cache.values), before, strict=True):
        changed = (pool != old).flatten(3).any(-1).any(0).flatten()  # [slots]: written this step
        written = {s.slot_mapping[0] for s in decodes}
        assert set(changed[: BLOCKS * BLOCK].nonzero().flatten().tolist()) == written
        assert changed[BLOCKS * BLOCK :].any()  # the padding row's scratch write


def test_multi_step_decode_through_the_static_path_gives_the_plain_tokens_and_stops_when_told(model):
    runs = []
    for mode in ("off", "eager"):
        runner = warm_runner(model, mode)
        decodes = decode_after_prefill(runner)
        steps = decode_steps(runner, decodes, 6, lambda: False)
        runs.append([[(r.seq_id, r.token_id) for r in results] for results in steps])
    assert len(runs[0]) == 6 and runs[0] == runs[1]
    runner.clear()
    asked = []
    interrupted = decode_steps(runner, decode_after_prefill(runner), 6, lambda: asked.append(1) or len(asked) == 3)
    assert [[(r.seq_id, r.token_id) for r in results] for results in interrupted] == runs[1][:3]


def test_steps_the_static_path_does_not_take_run_the_plain_forward(model):
    runner = warm_runner(model, "eager", max_graph_rows=2)
    decodes = decode_after_prefill(runner)
    assert not runner.decode_graphs.fits(decodes)  # 3 sequences, largest bucket 2
    assert runner.decode_graphs.fits([step(0, [5, 6], 5)])  # a 2-token chunk: two rows
    assert not runner.decode_graphs.fits([step(0, [5, 6, 7], 5)])
    assert len(runner.step(decodes)) == 3


def test_verification_and_short_chunks_take_the_static_path_with_the_plain_logits(model, kernels):
    """Several tokens a sequence as rows of their own: a verification (last token and proposals, every row
    kept), a 3-token chunk (its last row kept) and a decode, against the plain forward, K/V included."""
    plain, static = warm_runner(model, "off"), warm_runner(model, "eager")
    decodes = decode_after_prefill(plain)
    assert decode_after_prefill(static) == decodes
    verify = step(0, [decodes[0].token_ids[0], 300, 301], decodes[0].start_position)
    verify.num_proposed = 2
    chunk = step(1, [decodes[1].token_ids[0], 40, 41], decodes[1].start_position)
    mixed = [verify, chunk, decodes[2]]
    assert static.decode_graphs.fits(mixed)  # 7 rows in bucket 8
    expected = plain.forward(mixed)
    got = static.forward(mixed)
    assert got.shape[0] == 3 + 1 + 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.kv_cache.keys[:, :BLOCKS], plain.kv_cache.keys[:, :BLOCKS])
    torch.testing.assert_close(static.kv_cache.values[:, :BLOCKS], plain.kv_cache.values[:, :BLOCKS])


class _RefuseHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            raise AssertionError(f"host sync in a decode step: aten.{name}")
        return func(*args, **(kwargs or {}))


def test_a_decode_step_holds_no_host_sync(model):
    ops.select("torch", CPU, torch.float32)
    try:
        runner = warm_runner(model, "eager")
        decodes = decode_after_prefill(runner)
        graphs = runner.decode_graphs
        with _RefuseHostSync():
            graphs.forward(decodes)
        # The check can fail: the plain forward's sort-by-expert MoE reads expert counts back.
        with pytest.raises(AssertionError, match="bincount"), _RefuseHostSync(), torch.inference_mode():
            runner.model(
                graphs.static[0][:4], graphs.static[1][:4], runner.kv_cache, _meta(graphs, 4), graphs.logits_rows[:4]
            )
    finally:
        ops.select("auto", CPU, torch.float32)


def _meta(graphs: DecodeGraphRunner, bucket: int) -> AttentionMetadata:
    _, _, slots, tables, context_lens = (t[:bucket] for t in graphs.static)
    return AttentionMetadata(slots, bucket, tables, context_lens)


@pytest.mark.slow  # inductor compiles in worker processes
def test_the_decode_step_compiles_whole_and_matches_eager(model):
    """The graph runner's model forward under torch.compile(fullgraph=True), inductor: a graph break
    (a .tolist(), an .item(), a branch on a tensor's value) fails it."""
    ops.select("torch", CPU, torch.float32)
    try:
        runner = warm_runner(model, "eager", max_batch=4)
        graphs = runner.decode_graphs
        graphs.forward(decode_after_prefill(runner))  # the static buffers: three real rows, one padding row
        with torch.inference_mode():
            eager = graphs.run(4)
            compiled = torch.compile(graphs.run, fullgraph=True)(4)
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    finally:
        ops.select("auto", CPU, torch.float32)
