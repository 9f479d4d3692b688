"""KV cache sizing: the worst-case steps, the peak meter, the arithmetic, and Mixtral-8x7B's rank 0 of 4
at its real shapes on the meta device against an 80 GB A100."""

import pytest
import torch

from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model, weight_bytes
from mixserve.shards.memory import (
    InsufficientMemory,
    LiveBytes,
    StepLimits,
    measure_worst_case,
    plan_blocks,
    size_kv_cache,
    warmup_blocks,
    worst_case_steps,
)
from mixserve.shards.model import MixtralForCausalLM
from mixserve.shards.runner import ModelRunner

GiB = 1 << 30
A100_BYTES = 80 * 10**9
CUDA_CONTEXT_BYTES = GiB  # the CUDA context and NCCL's buffers, outside torch's allocator
MIXTRAL_8X7B = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
)


def test_limits_are_clamped_to_the_model():
    limits = StepLimits.clamped(4352, 256, 0, 32768)
    assert (limits.max_batch_tokens, limits.max_batch_size, limits.max_context) == (4352, 256, 32768)
    assert limits.max_prefill_chunk == 4352 - 255
    assert StepLimits.clamped(64, 256, 100_000, 4096).max_batch_size == 64
    assert StepLimits.clamped(64, 4, 100_000, 4096).max_context == 4096
    assert StepLimits(10_000, 1, 512).max_prefill_chunk == 512
    with pytest.raises(ValueError, match="max_batch_size"):
        StepLimits(64, 0, 512)


def test_worst_case_steps_reach_the_longest_context_over_few_blocks():
    limits = StepLimits(max_batch_tokens=40, max_batch_size=4, max_context=50)
    decodes, mixed = worst_case_steps(limits, block_size=8, vocab_size=100)
    assert [len(s.token_ids) for s in decodes] == [1, 1, 1, 1]
    assert [len(s.token_ids) for s in mixed] == [1, 1, 1, 37]
    for steps in (decodes, mixed):
        assert all(s.start_position + len(s.token_ids) == 50 and len(s.block_table) == 7 for s in steps)
        slots = [slot for s in steps for slot in s.slot_mapping]
        assert len(slots) == len(set(slots))  # no slot written twice
        assert all(slot // 8 != 0 for slot in slots)  # block 0 is the shared one, only read
        assert max(max(s.block_table) for s in steps) < warmup_blocks(limits, 8)
    assert sum(len(s.token_ids) for s in mixed) == limits.max_batch_tokens


def test_plan_blocks_subtracts_the_peak_and_the_headroom():
    assert plan_blocks(free_bytes=1000, peak_activation_bytes=300, headroom_bytes=100, block_bytes=64) == 9
    assert plan_blocks(free_bytes=1000, peak_activation_bytes=950, headroom_bytes=100, block_bytes=64) == 0


def test_live_bytes_counts_storages_once_and_their_release():
    with LiveBytes() as meter:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        view = a.view(10, 100)
        b = torch.empty(500, dtype=torch.bfloat16, device="meta")  # 1000 bytes
        del a, view
        c = torch.empty(10, device="meta")  # 40 bytes
    assert (meter.peak, meter.live) == (5000, 1040)
    del b, c


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    return load_model(demo_dir, parallel, TensorParallelGroup(parallel))


def test_cpu_sizing_keeps_the_memavailable_share_and_reports(demo_model):
    parallel = ParallelConfig()
    runner = ModelRunner(demo_model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.float32, 4)
    limits = StepLimits(64, 4, 128)
    budget = 100 * runner.bytes_per_block()
    report = size_kv_cache(runner, limits, weight_bytes(demo_model), 0, budget)
    assert report.num_blocks == runner.kv_cache.num_blocks == 100
    assert report.kv_cache_bytes == runner.kv_cache.nbytes == 100 * report.block_bytes
    assert report.free_bytes == budget and report.headroom_bytes == 0
    # The worst-case steps are not run on CPU: the budget is the share, whatever their peak.
    assert report.peak_activation_bytes == 0 and report.limits == limits
    assert size_kv_cache(runner, limits, 0, 40, budget).num_blocks == 40
    assert not runner.sequences
    # CUDA's measurement, run on the CPU model where asked: the C kernels' steps allocate too.
    assert measure_worst_case(runner, limits, runner.step) > 0 and not runner.sequences


@pytest.fixture(scope="module")
def mixtral_rank0_of_4():
    """Mixtral-8x7B's rank 0 of 4 in bf16 on the meta device, with a runner over it. The collectives
    are left out (a group of one): NCCL's all-reduce works in place, the logits gather is not run."""
    parallel = ParallelConfig(0, 4)
    alone = TensorParallelGroup(ParallelConfig())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = MixtralForCausalLM(MIXTRAL_8X7B, parallel, alone).eval()
    finally:
        torch.set_default_dtype(previous)
    return ModelRunner(model, parallel, alone, torch.device("meta"), torch.bfloat16, block_size=16)


def meta_peak(runner: ModelRunner, limits: StepLimits) -> int:
    return measure_worst_case(runner, limits, lambda steps: runner.forward(steps, gather_logits=False))


def test_mixtral_8x7b_rank0_of_4_fits_an_a100_as_sized(mixtral_rank0_of_4):
    runner = mixtral_rank0_of_4
    weights = weight_bytes(runner.model)
    assert weights == pytest.approx(21.7 * GiB, rel=0.01)
    assert runner.bytes_per_block() // runner.block_size == 2 * 32 * 2 * 128 * 2 == 32 << 10

    limits = StepLimits(max_batch_tokens=4096 + 256, max_batch_size=256, max_context=4096)
    peak = meta_peak(runner, limits)
    # The torch decode path gathers every row's blocks and SDPA's math fallback copies them to fp32 for
    # every query head (4.3 GB for keys, as much for values, and the scaled keys): over 12 GB. The Triton
    # decode attention CUDA runs allocates at most ~2 MiB a layer here (tests/test_triton_ops.py).
    gathered_fp32 = 256 * 4096 * 8 * 128 * 4
    assert peak > 3 * gathered_fp32

    free = A100_BYTES - CUDA_CONTEXT_BYTES - weights
    headroom = int(A100_BYTES * 0.05)
    blocks = plan_blocks(free, peak, headroom, runner.bytes_per_block())
    assert blocks > 0
    used = CUDA_CONTEXT_BYTES + weights + blocks * runner.bytes_per_block() + peak
    assert used + headroom <= A100_BYTES

    # Sized as before (0.9 of what a step at context 1 leaves), the same step would not fit.
    short = meta_peak(runner, StepLimits(4096 + 256, 256, 1))
    old_blocks = int((free - short) * 0.9) // runner.bytes_per_block()
    assert short < peak / 10
    assert CUDA_CONTEXT_BYTES + weights + old_blocks * runner.bytes_per_block() + peak > A100_BYTES


def test_mixtral_8x7b_at_batch_256_and_32k_context_leaves_no_room(mixtral_rank0_of_4):
    runner = mixtral_rank0_of_4
    peak = meta_peak(runner, StepLimits(4096 + 256, 256, 32768))
    free = A100_BYTES - CUDA_CONTEXT_BYTES - weight_bytes(runner.model)
    assert peak > free
    assert plan_blocks(free, peak, int(A100_BYTES * 0.05), runner.bytes_per_block()) == 0


def test_sizing_refuses_with_a_clear_message_when_no_block_fits(demo_model):
    parallel = ParallelConfig()
    runner = ModelRunner(demo_model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.float32, 4)
    with pytest.raises(InsufficientMemory, match="KV budget .* holds no block"):
        size_kv_cache(runner, StepLimits(64, 4, 128), 0, 0, runner.bytes_per_block() - 1)
