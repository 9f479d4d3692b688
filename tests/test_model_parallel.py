"""The sharded model against transformers' MixtralForCausalLM, in real processes over gloo, with
tensor-parallel experts (the default) and with expert parallelism (`-ep` groups)."""

import json

import pytest
import torch
from transformers import MixtralForCausalLM as ReferenceMixtral

from child_processes import PYTHON, REPO, run_ranks
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model

PROMPTS = [[1, 523, 77, 1200, 9, 4000, 31], [1, 88, 2900], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
DECODE_STEPS = 16


def run_group(model_dir, world_size: int, out, runs: dict[str, tuple[str, str, str]]) -> dict[str, list[dict]]:
    """Start `world_size` tp_worker processes with torchrun's variables, which make each of `runs` (name:
    collectives, MoE split, `--cuda-graphs`) one after another; return each run's records by rank."""
    named = [[name, *flags] for name, flags in runs.items()]
    cmd = [PYTHON, str(REPO / "tests" / "tp_worker.py"), str(model_dir), str(out), json.dumps(PROMPTS)]
    run_ranks([*cmd, str(DECODE_STEPS), json.dumps(named)], world_size)
    return {name: [torch.load(f"{out}.{name}.rank{r}") for r in range(world_size)] for name in runs}


@pytest.fixture(scope="module")
def reference(demo_dir):
    return ReferenceMixtral.from_pretrained(demo_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def groups(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    tp = ("auto", "tp", "auto")
    runs = run_group(demo_dir, 1, out / "ws1", {1: tp})
    runs |= run_group(
        demo_dir, 2, out / "ws2", {2: tp, "2-ep": ("auto", "ep", "auto"), "2-graphs": ("auto", "tp", "eager")}
    )
    return runs | run_group(
        demo_dir, 4, out / "ws4", {4: tp, "4-gloo": ("torch", "tp", "auto"), "4-ep": ("auto", "ep", "auto")}
    )


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 4, "4-gloo", "2-ep", "4-ep", "2-graphs"])
def test_logits_match_transformers_prefill_and_decode(groups, reference, world_size):
    """World size 4 runs twice: shared-memory collectives (the default on one host) and gloo; 2-ep and
    4-ep hold whole experts per rank (expert parallelism); 2-graphs decodes through the decode graph
    runner's static buffers (eager, three sequences padded to four)."""
    ranks = groups[world_size]
    seqs = ranks[0]["seqs"]
    assert all(r["seqs"] == seqs for r in ranks), "ranks disagree on the greedy tokens"
    logits = ranks[0]["logits"]  # [steps + 1, B, V]
    with torch.inference_mode():
        for i, prompt in enumerate(PROMPTS):
            full = torch.tensor([seqs[i][:-1]])
            expected = reference(full).logits[0, len(prompt) - 1 :]  # [steps + 1, V]
            torch.testing.assert_close(logits[:, i], expected, atol=2e-5, rtol=1e-4)
            assert seqs[i][len(prompt) :] == expected.argmax(-1).tolist(), "greedy tokens differ"
    # Past one rank the decode steps run every layer in one C call that all-reduces over shared memory
    # (shards/kernels/decoder_stack.py), except over gloo, where the layers run one by one.
    if world_size in (1, "4-gloo"):
        assert ranks[0]["shm_stack_runs"] == 0
    else:
        assert ranks[0]["shm_stack_runs"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4, "4-gloo", "2-ep", "2-graphs"])
def test_runner_steps_choose_what_one_rank_chooses(groups, world_size):
    """Plain greedy steps combine each rank's vocabulary slice without gathering the logits; with one
    sequence asking for alternatives the logits are gathered. Both choose one rank's tokens, with its
    log-probabilities (up to summation order), on every rank."""
    single = groups[1][0]["stepped"]
    for record in groups[world_size]:
        for case in ("plain", "alternatives"):
            got, want = record["stepped"][case], single[case]
            assert [[t for t, _ in row] for row in got] == [[t for t, _ in row] for row in want], case
            got_logprobs = torch.tensor([[lp for _, lp in row] for row in got])
            want_logprobs = torch.tensor([[lp for _, lp in row] for row in want])
            torch.testing.assert_close(got_logprobs, want_logprobs, atol=1e-5, rtol=1e-5)
    assert all(r["stepped"] == groups[world_size][0]["stepped"] for r in groups[world_size]), "ranks disagree"
    tokens = {case: [[t for t, _ in row] for row in single[case]] for case in single}
    assert tokens["plain"] == tokens["alternatives"], "asking for alternatives changed the choice"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_logits_equal_tensor_parallel(groups, world_size):
    tp, ep = groups[world_size][0], groups[f"{world_size}-ep"][0]
    assert ep["seqs"] == tp["seqs"]
    torch.testing.assert_close(ep["logits"], tp["logits"], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_each_rank_holds_only_its_slice(groups, demo_dir):
    config = ModelConfig.from_pretrained(demo_dir)
    experts, inter, hidden = config.num_local_experts, config.intermediate_size, config.hidden_size
    full = groups[1][0]["shapes"]
    for run in (2, 4, "2-ep", "4-ep"):
        world_size = int(str(run)[0])
        for rank, record in enumerate(groups[run]):
            shapes = record["shapes"]
            w13 = shapes["layers.0.block_sparse_moe.w13"][0]
            if str(run).endswith("-ep"):  # whole experts, E / n of them
                assert w13 == [experts // world_size, 2 * inter, hidden]
            else:  # a slice of every expert
                assert w13 == [experts, 2 * inter // world_size, hidden]
            qkv = shapes["layers.0.self_attn.qkv_proj.weight"][0]
            heads = (config.num_attention_heads + 2 * config.num_key_value_heads) // world_size
            assert qkv == [heads * config.head_dim, config.hidden_size]
            assert shapes["lm_head.weight"][0] == [config.vocab_size // world_size, config.hidden_size]
            replicated = sum(b for name, (_, b) in full.items() if "norm" in name or name.endswith(".gate"))
            expected = (record_total(full) - replicated) // world_size + replicated
            assert record["weight_bytes"] == expected, f"rank {rank} of {run} holds more than its slice"


def record_total(shapes: dict) -> int:
    return sum(b for _, b in shapes.values())


@pytest.mark.parametrize("world_size", [3, 16])
def test_bad_world_size_says_why(demo_dir, world_size):
    with pytest.raises(ValueError, match=f"not divisible by {world_size}"):
        load_model(demo_dir, ParallelConfig(0, world_size), TensorParallelGroup(ParallelConfig(0, world_size)))
