"""A bf16 model whose larger products run in AMX's tiles (shards/kernels/rows_times_weight_amx.h, where the
machine has them): a verification step's rows get the very logits plain decode steps give, through the
decoder layer kernel and the LM head, so speculation keeps greedy outputs; and the model's greedy picks
agree with torch bf16's. Where the machine has no tiles the same checks run the vector path."""

import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.demo.checkpoint import DemoConfig, ensure_demo_checkpoint
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels import moe
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sequence_step import SequenceStep

BF16 = torch.bfloat16
CPU = torch.device("cpu")
BLOCK = 16
# Each expert's w1/w3 [2048, 512] and w2 [512, 1024], q/k/v [1024, 512] and the LM head [2048, 512] are 2^19
# elements or more with K 512 and more: the tiles (AMX_MIN_WEIGHT, AMX_MIN_K); o [512, 512] and the router's
# gate are smaller and take the vector loop.
TILED_MODEL = DemoConfig(
    hidden_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=1024,
    vocab_size=2048,
    seed=3,
)
PROMPT = [1, 17, 300, 4, 1999, 52, 8, 77, 1024, 5, 600]


@pytest.fixture(scope="module")
def model():
    parallel = ParallelConfig()
    return load_model(ensure_demo_checkpoint(TILED_MODEL), parallel, TensorParallelGroup(parallel), dtype=BF16)


@pytest.fixture
def bf16_kernels(native):  # noqa: F811 - the conftest fixture that chooses the C kernels
    chosen = ops.select("native", CPU, BF16)
    yield chosen
    ops.select("auto", CPU, torch.float32)


def new_runner(model) -> ModelRunner:
    parallel = ParallelConfig()
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), CPU, BF16, BLOCK)
    runner.allocate_cache(8)
    return runner


def step(tokens: list[int], start: int, num_proposed: int = 0) -> SequenceStep:
    table = list(range(4))
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + len(tokens))]
    return SequenceStep(1, tokens, start, slots, table, True, None, num_proposed=num_proposed)


def test_cpu_tiles_off_keeps_every_product_on_the_vector_loop(native, model):  # noqa: F811 - the conftest fixture
    """`--cpu-tiles off` (ops.select's amx_tiles): the report says so, and where the tiles run by default the
    model's logits change (another order of the same sums), so the switch reached the kernels."""
    steps = [step(PROMPT, 0)]
    default = ops.select("native", CPU, BF16)
    tiled = ops.kernels_report(default, BF16)["amx_tile_products"]
    with_tiles = new_runner(model).forward(steps)
    off = ops.select("native", CPU, BF16, amx_tiles=False)
    try:
        assert not ops.kernels_report(off, BF16)["amx_tile_products"] and not moe.amx_tile_products()
        without = new_runner(model).forward(steps)
    finally:
        ops.select("auto", CPU, torch.float32)
    assert moe.amx_tile_products() == tiled
    assert torch.equal(with_tiles, without) != tiled
    torch.testing.assert_close(with_tiles.float(), without.float(), rtol=0.05, atol=0.05)


def test_a_verification_steps_rows_get_plain_decode_steps_logits(bf16_kernels, model):
    tokens = [5, 900, 41, 1500, 7]
    plain = new_runner(model)
    plain.forward([step(PROMPT, 0)])
    expected = torch.cat([plain.forward([step([t], len(PROMPT) + i)]) for i, t in enumerate(tokens)])

    spec = new_runner(model)
    spec.forward([step(PROMPT, 0)])
    got = spec.forward([step(tokens, len(PROMPT), num_proposed=len(tokens) - 1)])
    assert got.shape == expected.shape == (len(tokens), TILED_MODEL.vocab_size)
    assert torch.equal(got, expected)


def test_greedy_picks_agree_with_torch_bf16(bf16_kernels, model):
    """Teacher-forced over one sequence: the kernels' decode steps (tiles where the machine has them)
    against torch's, top-1 at >= 90 % of positions and logits close (random weights: near ties are
    common; torch rounds every activation to bf16, the kernels keep the residual stream in fp32)."""
    sequence = PROMPT + [33, 1800, 2, 640, 1100, 9, 71, 450, 1300, 12]

    def decode_logits() -> torch.Tensor:
        runner = new_runner(model)
        runner.forward([step(PROMPT, 0)])
        return torch.cat([runner.forward([step([t], len(PROMPT) + i)]) for i, t in enumerate(sequence[len(PROMPT) :])])

    ours = decode_logits()
    ops.select("torch", CPU, BF16)
    theirs = decode_logits()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.1, atol=0.1)
