"""The shared-memory collectives of one host's CPU shards, in real groups, through the C exchange
(shm_exchange.c) and through torch ops: every rank gets the same bits, the sum of the ranks' parts
in rank order, and both paths agree bit for bit."""

import subprocess
import uuid

import pytest
import torch
from shm_collectives_worker import SHAPES, part

from child_processes import PYTHON, REPO, run_ranks, subprocess_env
from mixserve.shards.kernels import native
from mixserve.shards.shm_collectives import SharedMemoryGroup


def run_group(tmp_path, world_size: int) -> dict[str, list[dict]]:
    """Each rank's records of a group that runs the collectives through the C exchange, then through torch ops."""
    out = tmp_path / f"shm-{world_size}"
    run_ranks([PYTHON, str(REPO / "tests" / "shm_collectives_worker.py"), str(out)], world_size)
    return {
        kernels: [torch.load(f"{out}.{kernels}.rank{r}") for r in range(world_size)] for kernels in ("native", "torch")
    }


def rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_rank_order_sum_bit_for_bit_on_either_path(tmp_path, world_size):
    runs = run_group(tmp_path, world_size)
    for kernels, records in runs.items():
        for record in records:
            for call, (shape, got) in enumerate(zip(SHAPES, record["reduced"], strict=True)):
                expected = rank_order_sum([part(r, call, shape) for r in range(world_size)])
                assert torch.equal(got, expected), f"{kernels}: call {call} {shape}"
            strided = rank_order_sum([part(r, 50, (16, 6))[:, ::2] for r in range(world_size)])
            assert torch.equal(record["strided"], strided)
            float64 = rank_order_sum([part(r, 51, (5, 3), torch.float64) for r in range(world_size)])
            assert torch.equal(record["float64"], float64)
            for got, (call, shape) in zip(record["gathered"], [(60, (4, 3)), (61, (2, 5, 7))], strict=True):
                parts = [part(r, call, shape, torch.float64) for r in range(world_size)]
                assert torch.equal(got, torch.cat(parts, dim=-1))
            assert record["any"] == [True] * world_size + [False]
    if world_size == 3:  # the parts are such that another order of the sum shows in the bits
        p = [part(r, 2, SHAPES[2]) for r in range(3)]
        assert not torch.equal(p[0] + (p[1] + p[2]), rank_order_sum(p))
    for native_record, torch_record in zip(runs["native"], runs["torch"], strict=True):
        for a, b in zip(native_record["reduced"], torch_record["reduced"], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_a_rank_that_never_arrives_times_out(kernels):
    native.select(kernels, ("shm_exchange",))
    try:
        group = SharedMemoryGroup(f"mixserve-test-{uuid.uuid4().hex[:12]}", 0, 2, slot_bytes=4096, create=True)
        try:
            group.timeout_s = 0.2
            with pytest.raises(TimeoutError, match="never reached call 1"):
                group.all_reduce(torch.ones(4))
        finally:
            group.unlink()
    finally:
        native.select("auto")


# Ranks spawned from one parent share its resource tracker: rank 1's attach must not unregister the
# segment rank 0 created, or rank 0's unlink makes the tracker print a KeyError traceback.
SPAWNED_RANKS = """
import multiprocessing, sys, uuid
from mixserve.shards.shm_collectives import SharedMemoryGroup

def rank(index, name, created, attached):
    if index == 1:
        created.wait(60)  # as the shards attach only after the creator's rendezvous
    group = SharedMemoryGroup(name, index, 2, 4096, create=index == 0)
    if index == 1:
        attached.set()
    else:
        created.set()
        attached.wait(60)
        group.unlink()

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    created, attached = context.Event(), context.Event()
    name = "mixserve-test-" + uuid.uuid4().hex[:12]
    ranks = [context.Process(target=rank, args=(i, name, created, attached)) for i in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(60)
    sys.exit(max(process.exitcode for process in ranks))
"""


@pytest.mark.slow
def test_ranks_spawned_from_one_parent_leave_the_tracker_consistent(tmp_path):
    script = tmp_path / "spawned_ranks.py"
    script.write_text(SPAWNED_RANKS)
    done = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KeyError" not in done.stderr and "leaked" not in done.stderr, done.stderr[-2000:]
