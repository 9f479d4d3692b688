"""Multi-step decode on the shards: the same tokens as one step per call, and interrupts agreed by every rank."""

import threading
from dataclasses import replace

import pytest
import torch

from child_processes import start_shards
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.multi_step import decode_steps
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import InvalidStep, SequenceStep
from mixserve_pb import shard_pb2

BLOCK = 16
# 512 positions a sequence: room for runs long enough that an interrupt sent mid-run lands in them.
BLOCKS_PER_SEQ = 32
PROMPTS = [[1, 523, 77, 1200, 9], [1, 88, 2900, 15, 16, 17, 18, 19, 20], [1, 4000]]
SAMPLING = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=11, repetition_penalty=1.3),
    SamplingParams(temperature=1.2, seed=5, frequency_penalty=0.5, presence_penalty=0.4, top_n_tokens=3),
]


def table(seq: int) -> list[int]:
    return list(range(seq * BLOCKS_PER_SEQ, (seq + 1) * BLOCKS_PER_SEQ))


def slot(seq: int, position: int) -> int:
    return table(seq)[position // BLOCK] * BLOCK + position % BLOCK


def prefill_steps() -> list[SequenceStep]:
    return [
        SequenceStep(i, p, 0, [slot(i, q) for q in range(len(p))], table(i), True, SAMPLING[i])
        for i, p in enumerate(PROMPTS)
    ]


def decode_step(seq: int, token: int, position: int) -> SequenceStep:
    return SequenceStep(seq, [token], position, [slot(seq, position)], table(seq), True, None)


@pytest.fixture(scope="module")
def runner(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    model = load_model(demo_dir, parallel, group, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, parallel, group, torch.device("cpu"), torch.float32, BLOCK)
    runner.allocate_cache(len(PROMPTS) * BLOCKS_PER_SEQ)
    return runner


def first_decode(runner: ModelRunner) -> list[SequenceStep]:
    runner.clear()
    results = runner.step(prefill_steps())
    return [decode_step(r.seq_id, r.token_id, len(PROMPTS[r.seq_id])) for r in results]


def test_multi_step_gives_the_tokens_of_single_steps(runner):
    """Greedy, seeded sampling with penalties and top-n logprobs alike: one call of 20 steps or 20 calls."""
    steps = first_decode(runner)
    single = []
    for _ in range(20):
        results = runner.step(steps)
        single.append([(r.seq_id, r.token_id, r.logprob, r.top_tokens) for r in results])
        steps = [decode_step(r.seq_id, r.token_id, s.start_position + 1) for s, r in zip(steps, results, strict=True)]

    multi = [
        [(r.seq_id, r.token_id, r.logprob, r.top_tokens) for r in results]
        for results in decode_steps(runner, first_decode(runner), 20, lambda: False)
    ]
    assert multi == single
    assert len({tuple(t for _, t, _, _ in step) for step in multi}) > 1, "the tokens should change step to step"


def gained(results) -> dict[int, list[tuple]]:
    """Each sequence's tokens of one step, with logprob and top alternatives (a verification step's several)."""
    return {
        r.seq_id: [(r.token_id, r.logprob, r.top_tokens)]
        + [(t.token_id, t.logprob, t.top_tokens) for t in r.next_tokens]
        for r in results
    }


@pytest.mark.parametrize("speculate", [1, 3, 5])
def test_a_speculating_run_gives_the_tokens_of_single_steps(runner, speculate):
    """n-gram proposals made before each step of the run and verified in it: greedy and seeded sampling with
    penalties give the tokens, logprobs and alternatives of plain steps; the run ends once a sequence gained
    its num_steps tokens, in fewer steps than tokens where proposals were kept."""
    num_steps = 24
    single: dict[int, list[tuple]] = {0: [], 1: [], 2: []}
    steps = first_decode(runner)
    for _ in range(num_steps):
        results = runner.step(steps)
        for seq_id, tokens in gained(results).items():
            single[seq_id] += tokens
        steps = [decode_step(r.seq_id, r.token_id, s.start_position + 1) for s, r in zip(steps, results, strict=True)]

    speculating = [replace(s, speculate=speculate) for s in first_decode(runner)]
    spec: dict[int, list[tuple]] = {0: [], 1: [], 2: []}
    proposed = runs = 0
    for results in decode_steps(runner, speculating, num_steps, lambda: False):
        runs += 1
        proposed += sum(r.num_drafted for r in results)
        assert all(r.num_drafted <= speculate for r in results)
        for seq_id, tokens in gained(results).items():
            spec[seq_id] += tokens
    for seq_id, tokens in spec.items():
        expected = single[seq_id][: len(tokens)]
        # A verification step's positions run as one chunk: its logprobs round apart from a decode's.
        assert [(t, [a for a, _ in top]) for t, _, top in tokens] == [
            (t, [a for a, _ in top]) for t, _, top in expected
        ]
        assert [lp for _, lp, _ in tokens] == pytest.approx([lp for _, lp, _ in expected], abs=1e-4)
    assert max(len(t) for t in spec.values()) == num_steps
    assert proposed > 0
    assert runs < num_steps  # the demo repeats itself: some proposals were kept


def test_a_run_stops_when_the_ranks_agree(runner):
    answers = iter([False, False, True])
    produced = list(decode_steps(runner, first_decode(runner), 10, lambda: next(answers)))
    assert len(produced) == 3  # the first step runs unasked; then two "go on" and one "stop"


def test_a_run_may_fill_its_block_table_to_the_last_slot(runner):
    steps = first_decode(runner)
    num_steps = 30
    for i, s in enumerate(steps):
        blocks = -(-(s.start_position + num_steps) // BLOCK)
        steps[i] = SequenceStep(s.seq_id, s.token_ids, s.start_position, s.slot_mapping, s.block_table[:blocks])
    assert len(list(decode_steps(runner, steps, num_steps, lambda: False))) == num_steps


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: SequenceStep(s.seq_id, [5, 6], s.start_position, [1, 2], s.block_table), "one sampled decode"),
        (lambda s: SequenceStep(s.seq_id, s.token_ids, s.start_position, s.slot_mapping, s.block_table, False), "one"),
        (lambda s: SequenceStep(s.seq_id, s.token_ids, s.start_position, s.slot_mapping, s.block_table[:1]), "cover"),
    ],
)
def test_bad_runs_are_refused_before_any_step(runner, change, message):
    steps = first_decode(runner)
    steps[0] = change(steps[0])
    with pytest.raises(InvalidStep, match=message):
        next(decode_steps(runner, steps, 40, lambda: False))


def test_a_step_request_releases_finished_sequences_first(runner, demo_dir):
    """Releases ride on the next step (no Release call of their own): the shard forgets them."""
    from mixserve.shards.server import ShardServicer

    steps = first_decode(runner)
    assert set(runner.sequences) == {0, 1, 2}
    step = steps[0]
    request = shard_pb2.StepRequest(
        sequences=[
            shard_pb2.SequenceStep(
                seq_id=step.seq_id,
                token_ids=step.token_ids,
                start_position=step.start_position,
                slot_mapping=step.slot_mapping,
                block_table=step.block_table,
                sample=True,
            )
        ],
        release_seq_ids=[1, 2],
    )
    response = ShardServicer(runner, str(demo_dir), 0).Step(request, None)
    assert [r.seq_id for r in response.results] == [0]
    assert set(runner.sequences) == {0}


# -- two shard processes over gRPC ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_pair(demo_dir, tmp_path_factory):
    procs, stubs = start_shards(demo_dir, tmp_path_factory.mktemp("uds"), 2)
    everyone(stubs, "Warmup", shard_pb2.WarmupRequest(max_batch_tokens=32, max_batch_size=4, max_blocks=128))
    yield stubs
    for p in procs:
        p.kill()
        p.wait()


def proto_step(seq: int, tokens: list[int], start: int, sampling: SamplingParams | None) -> shard_pb2.SequenceStep:
    step = shard_pb2.SequenceStep(
        seq_id=seq,
        token_ids=tokens,
        start_position=start,
        slot_mapping=[slot(seq, p) for p in range(start, start + len(tokens))],
        block_table=table(seq),
        sample=True,
    )
    if sampling is not None:
        step.sampling.CopyFrom(shard_pb2.SamplingParams(temperature=sampling.temperature, seed=sampling.seed))
    return step


def everyone(stubs, method: str, request):
    return [f.result() for f in [getattr(s, method).future(request, timeout=120) for s in stubs]]


def start_run(stubs, run_id: int, num_steps: int) -> shard_pb2.StepRequest:
    """Clear both ranks, prefill the prompts greedily, and return the DecodeSteps request that follows."""
    everyone(stubs, "Clear", shard_pb2.ClearRequest())
    prompts = [proto_step(i, p, 0, SAMPLING[0]) for i, p in enumerate(PROMPTS)]
    first = everyone(stubs, "Step", shard_pb2.StepRequest(sequences=prompts))[0]
    decodes = [proto_step(r.seq_id, [r.token_id], len(PROMPTS[r.seq_id]), None) for r in first.results]
    request = shard_pb2.StepRequest(sequences=decodes, num_steps=num_steps, run_id=run_id)
    return request


def read_all(stubs, request, on_first=None, messages: list[int] | None = None) -> list[shard_pb2.StepResponse]:
    """Read the run on every rank at once (as the router must), in threads; rank 0's answers (one per
    step, each message's `following` unpacked; the steps of each message appended to `messages`), after
    checking that every other rank answered once, at the end, with the same last step."""
    answers: list[list[shard_pb2.StepResponse]] = [[] for _ in stubs]

    def read(rank: int) -> None:
        for response in stubs[rank].DecodeSteps(request, timeout=120):
            if rank == 0 and messages is not None:
                messages.append(1 + len(response.following))
            following = list(response.following)
            assert rank == 0 or not following, "a rank past 0 sends one answer"
            assert not any(f.following for f in following), "a following step has none of its own"
            response.ClearField("following")
            answers[rank] += [response, *following]
            if rank == 0 and len(answers[0]) == 1 and on_first is not None:
                on_first()

    threads = [threading.Thread(target=read, args=(r,)) for r in range(len(stubs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    steps = answers[0]
    assert [a.steps for a in steps] == list(range(1, len(steps) + 1))
    for rank in range(1, len(stubs)):
        assert len(answers[rank]) == 1, "a rank past 0 answers once per run"
        assert answers[rank][0].steps == len(steps), "every rank ran the same steps"
        assert answers[rank][0].results == steps[-1].results
    return steps


def tokens(answers: list[shard_pb2.StepResponse]) -> list[list[int]]:
    """[step][seq]"""
    return [[r.token_id for r in a.results] for a in answers]


@pytest.mark.slow
def test_interrupting_one_rank_stops_both_at_the_same_step(shard_pair):
    stubs = shard_pair
    # 400 steps: on a fast machine 60 demo steps (~30 ms) once ended before the interrupt reached rank 1.
    full = tokens(read_all(stubs, start_run(stubs, run_id=1, num_steps=400)))
    assert len(full) == 400

    # Only rank 1 hears the interrupt; the ranks still agree on where to stop.
    request = start_run(stubs, run_id=2, num_steps=400)
    cut = tokens(read_all(stubs, request, on_first=lambda: stubs[1].Interrupt(shard_pb2.InterruptRequest(run_id=2))))
    assert 1 <= len(cut) < 400
    assert cut == full[: len(cut)], "an interrupted run still gives the same tokens"


@pytest.mark.slow
def test_a_stream_interval_sends_a_fast_runs_steps_together(shard_pair):
    """With an interval longer than the run, rank 0's sender is woken only by the first step and by the
    end, so later steps travel in others' answers (the sender also takes, without waiting, the steps made
    while it sent the last answer); the steps and their tokens are those of a run sent step by step."""
    stubs = shard_pair
    full = tokens(read_all(stubs, start_run(stubs, run_id=3, num_steps=20)))
    request = start_run(stubs, run_id=4, num_steps=20)
    request.stream_interval_us = 60_000_000
    grouped: list[int] = []
    assert tokens(read_all(stubs, request, messages=grouped)) == full
    assert sum(grouped) == 20 and len(grouped) < 20


@pytest.mark.slow
def test_an_interrupt_that_overtakes_its_run_still_stops_it(shard_pair):
    stubs = shard_pair
    request = start_run(stubs, run_id=5, num_steps=30)
    everyone(stubs, "Interrupt", shard_pb2.InterruptRequest(run_id=5))
    assert len(read_all(stubs, request)) == 1
