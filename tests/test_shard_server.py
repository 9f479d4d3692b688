"""Four real shard processes answering Info, Health, Warmup and steps over gRPC (unix sockets)."""

import subprocess

import grpc
import pytest
import torch

from child_processes import PYTHON, start_shards, subprocess_env
from mixserve.shards.devices import resolve_dtype
from mixserve_pb import shard_pb2

pytestmark = pytest.mark.slow

WORLD_SIZE = 4
BLOCK = 16


@pytest.fixture(scope="module")
def shards(demo_dir, tmp_path_factory):
    sockets = tmp_path_factory.mktemp("uds")
    procs, stubs = start_shards(demo_dir, sockets, WORLD_SIZE)
    yield stubs, sockets
    for p in procs:
        p.kill()
        p.wait()


def everyone(stubs, method: str, request):
    """Send the same call to every shard at once (as the router does) and return every answer."""
    calls = [getattr(stub, method).future(request, timeout=120) for stub in stubs]
    return [c.result() for c in calls]


def greedy_step(seq_id: int, tokens: list[int], start: int, blocks: list[int], first: bool):
    slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + len(tokens))]
    step = shard_pb2.SequenceStep(
        seq_id=seq_id, token_ids=tokens, start_position=start, slot_mapping=slots, block_table=blocks, sample=True
    )
    if first:
        step.sampling.CopyFrom(shard_pb2.SamplingParams(temperature=0.0, seed=1, top_n_tokens=3))
    return step


def test_info_health_warmup_and_steps(shards, tmp_path):
    stubs, sockets = shards
    infos = everyone(stubs, "Info", shard_pb2.InfoRequest())
    assert [i.rank for i in infos] == list(range(WORLD_SIZE))
    assert {i.world_size for i in infos} == {WORLD_SIZE}
    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert infos[0].dtype == auto and infos[0].num_experts == 8
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in sockets.iterdir())

    warm = everyone(stubs, "Warmup", shard_pb2.WarmupRequest(max_batch_tokens=256, max_batch_size=8, max_blocks=64))
    assert {w.num_blocks for w in warm} == {64}
    assert not infos[0].HasField("memory")
    sized = everyone(stubs, "Info", shard_pb2.InfoRequest())[0].memory
    assert sized == warm[0].memory and sized.kv_cache_bytes == 64 * sized.block_bytes
    assert sized.peak_activation_bytes == 0 and sized.weight_bytes == infos[0].weight_bytes  # not run on CPU
    assert (sized.max_batch_size, sized.max_context_tokens) == (8, infos[0].max_position_embeddings)
    assert all(h.ready for h in everyone(stubs, "Health", shard_pb2.HealthRequest()))

    prompt = [1, 20, 30, 40, 50]
    answers = everyone(stubs, "Step", shard_pb2.StepRequest(sequences=[greedy_step(7, prompt, 0, [3], True)]))
    tokens = {a.results[0].token_id for a in answers}
    assert len(tokens) == 1, "ranks sampled different tokens"
    result = answers[0].results[0]
    assert result.seq_id == 7 and result.sampled and len(result.top_tokens) == 3
    assert result.top_tokens[0].token_id == result.token_id  # greedy picks the most likely
    assert result.logprob == pytest.approx(result.top_tokens[0].logprob)

    bad = shard_pb2.StepRequest(sequences=[greedy_step(8, [1, 2], 0, [5000], True)])
    with pytest.raises(grpc.RpcError) as failure:
        everyone(stubs, "Step", bad)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    malformed = shard_pb2.StepRequest(sequences=[greedy_step(8, [1, 2], 0, [5], True)])
    malformed.sequences[0].ClearField("block_table")
    with pytest.raises(grpc.RpcError) as failure:
        everyone(stubs, "Step", malformed)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    nxt = everyone(stubs, "Step", shard_pb2.StepRequest(sequences=[greedy_step(7, [result.token_id], 5, [3], False)]))
    assert len({a.results[0].token_id for a in nxt}) == 1
    everyone(stubs, "Release", shard_pb2.ReleaseRequest(seq_ids=[7]))
    unknown = shard_pb2.StepRequest(sequences=[greedy_step(7, [result.token_id], 5, [3], False)])
    with pytest.raises(grpc.RpcError) as failure:
        everyone(stubs, "Step", unknown)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_world_size_exits_with_a_reason(demo_dir, tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "mixserve.cli", "shard", "--model", str(demo_dir), "--uds", str(tmp_path / "s")],
        env=subprocess_env(RANK="0", WORLD_SIZE="3"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "not divisible by 3" in proc.stderr
