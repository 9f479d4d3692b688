"""Speculative verification on a shard: the acceptance rule keeps the sampling distribution, and a
verification step over the paged cache gives the tokens ordinary decode steps give."""

import math
from dataclasses import replace

import pytest
import torch

from mixserve.shards import ngram
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.parallel_greedy import greedy_choice
from mixserve.shards.proposal_length import ProposalLength
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling import sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import InvalidStep, SequenceStep
from mixserve.shards.speculative import greedy_runs, num_accepted, verify
from mixserve.shards.token_history import TokenHistory

BLOCK = 4
# 0.999 quantile of chi-square with 5 degrees of freedom: a correct rule fails 1 run in 1000.
CHI2_5_999 = 20.515


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


def penalised(row: torch.Tensor, penalty: float, seen: list[int]) -> torch.Tensor:
    """`row` with the repetition penalty applied to the `seen` tokens."""
    out = row.clone()
    for token in seen:
        out[token] = out[token] / penalty if out[token] > 0 else out[token] * penalty
    return out


def test_num_accepted_stops_at_the_first_disagreement():
    assert num_accepted([5, 6, 7], [5, 6]) == 2
    assert num_accepted([5, 9, 7], [5, 6]) == 1
    assert num_accepted([4, 6, 7], [5, 6]) == 0


def test_greedy_runs_split_picks_by_sequence():
    # Sequence 1: proposals 5 6, both right; sequence 2: none; sequence 3: proposal 3, wrong.
    runs = greedy_runs([5, 6, 7, 9, 1, 2], [-0.5, -0.6, -0.7, -0.9, -0.1, -0.2], [[5, 6], [], [3]])
    assert [[t.token_id for t in run] for run in runs] == [[5, 6, 7], [9], [1]]
    assert [t.logprob for t in runs[0]] == [-0.5, -0.6, -0.7] and runs[2][0].logprob == -0.1


@pytest.mark.parametrize("penalty", [1.0, 1.3], ids=["batched", "per-position"])
def test_sampled_verification_keeps_the_distribution(penalty):
    """Proposal 2 at the first position and 4 at the second: the emitted first token follows p, the
    proposal is accepted with probability p(2), and every draw equals direct sampling with its seed."""
    logits = torch.tensor([[1.0, 0.5, 1.5, -0.5, 0.0, 0.8], [0.2, 0.1, -1.0, 0.4, 1.2, 0.0]])  # [2, V]
    params = [SamplingParams(temperature=0.9, seed=seed, repetition_penalty=penalty) for seed in range(4000)]
    first_counts, accepted, second_counts = [0] * 6, 0, [0] * 6
    for p in params:
        history = TokenHistory()
        history.add_prompt([0])
        run = verify(logits, [2], p, history, first_key=10)
        direct_history = TokenHistory()
        direct_history.add_prompt([0])
        direct = sample(logits[:1], [p], [direct_history], [10]).token_ids.item()
        assert run[0].token_id == direct
        first_counts[run[0].token_id] += 1
        if len(run) == 2:
            accepted += 1
            second_counts[run[1].token_id] += 1
    first_probs = (penalised(logits[0], penalty, [0]) / 0.9).softmax(-1).tolist()
    assert chi_square(first_counts, first_probs) < CHI2_5_999
    assert accepted == first_counts[2]
    assert abs(accepted / len(params) - first_probs[2]) < 4 * math.sqrt(first_probs[2] / len(params))
    # After the accepted proposal the history holds the prompt token and it.
    second_probs = (penalised(logits[1], penalty, [0, 2]) / 0.9).softmax(-1).tolist()
    assert chi_square(second_counts, second_probs) < CHI2_5_999


@pytest.fixture(scope="module")
def model(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    return load_model(demo_dir, parallel, TensorParallelGroup(parallel))


def new_runner(model, adaptive_length: bool = True) -> ModelRunner:
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    runner = ModelRunner(
        model, parallel, group, torch.device("cpu"), torch.float32, BLOCK, adaptive_length=adaptive_length
    )
    runner.allocate_cache(32)
    return runner


def step(seq_id, tokens, start, sampling=None, num_proposed=0) -> SequenceStep:
    table = list(range(8))
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + len(tokens))]
    return SequenceStep(seq_id, tokens, start, slots, table, True, sampling, num_proposed=num_proposed)


PROMPT = [1, 40, 41, 42, 43, 40, 41]


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(), SamplingParams(temperature=0.8, seed=7, frequency_penalty=0.5, top_n_tokens=2)],
    ids=["greedy", "seeded"],
)
def test_verification_step_gives_the_tokens_of_plain_decode_steps(model, sampling):
    plain = new_runner(model)
    expected = [plain.step([step(1, PROMPT, 0, sampling)])[0]]
    for _ in range(5):
        expected.append(plain.step([step(1, [expected[-1].token_id], len(PROMPT) + len(expected) - 1)])[0])
    ids = [r.token_id for r in expected]

    spec = new_runner(model)
    assert spec.step([step(1, PROMPT, 0, sampling)])[0].token_id == ids[0]
    # Two right proposals and a wrong one: three tokens come back, the third the true one.
    wrong = (ids[3] + 1) % model.config.vocab_size
    result = spec.step([step(1, [ids[0], ids[1], ids[2], wrong], len(PROMPT), num_proposed=3)])[0]
    got = [result.token_id] + [t.token_id for t in result.next_tokens]
    assert got == ids[1:4]
    assert result.logprob == pytest.approx(expected[1].logprob, abs=1e-4)
    assert len(result.top_tokens) == len(result.next_tokens[0].top_tokens) == sampling.top_n_tokens
    assert [t for t, _ in result.next_tokens[0].top_tokens] == [t for t, _ in expected[2].top_tokens]
    # The next step overwrites the rejected position and continues as plain decode would.
    result = spec.step([step(1, [ids[3], ids[4]], len(PROMPT) + 3, num_proposed=1)])[0]
    assert [result.token_id] + [t.token_id for t in result.next_tokens] == ids[4:6]


def test_one_rank_plain_greedy_gives_the_general_samplers_tokens(model, monkeypatch):
    """Plain greedy takes parallel greedy's C calls on one rank too (its slice is the whole vocabulary; with
    no mask or bias, the forward's own greedy statistics combined); asking for one alternative sends the
    same steps through the general sampler, which must agree on every token and log-probability, in decode
    steps and in a verification step."""
    import mixserve.shards.runner as runner_module

    calls = []

    def counted(original):
        def call(*args):
            calls.append(args[0].shape[0])
            return original(*args)

        return call

    monkeypatch.setattr(runner_module, "greedy_choice", counted(greedy_choice))
    fast, general = new_runner(model), new_runner(model)
    runs = {}
    for runner, sampling in ((fast, SamplingParams()), (general, SamplingParams(top_n_tokens=1))):
        first = runner.step([step(1, PROMPT, 0, sampling)])[0]
        got = [(first.token_id, first.logprob)]
        for _ in range(4):
            r = runner.step([step(1, [got[-1][0]], len(PROMPT) + len(got) - 1)])[0]
            got.append((r.token_id, r.logprob))
        runs[runner] = got
    assert [t for t, _ in runs[fast]] == [t for t, _ in runs[general]]
    torch.testing.assert_close([lp for _, lp in runs[fast]], [lp for _, lp in runs[general]], atol=1e-4, rtol=0)
    assert calls == [1] * 5, "the plain greedy steps must take the fast path, and only they"

    ids = [t for t, _ in runs[fast]]
    wrong = (ids[3] + 1) % model.config.vocab_size
    verified = {}
    for runner in (fast, general):
        r = runner.step([step(1, [ids[4], ids[0], ids[1], wrong], len(PROMPT) + 4, num_proposed=3)])[0]
        verified[runner] = [(r.token_id, r.logprob)] + [(t.token_id, t.logprob) for t in r.next_tokens]
    assert [t for t, _ in verified[fast]] == [t for t, _ in verified[general]]
    torch.testing.assert_close([lp for _, lp in verified[fast]], [lp for _, lp in verified[general]], atol=1e-4, rtol=0)
    assert calls[-1] == 4


def test_proposals_are_refused_where_they_cannot_be_verified(model):
    runner = new_runner(model)
    runner.step([step(1, PROMPT, 0, SamplingParams())])
    with pytest.raises(InvalidStep, match="the first is its own"):
        runner.step([step(1, [5, 6], len(PROMPT), num_proposed=2)])
    bad = step(1, [5, 6], len(PROMPT), num_proposed=1)
    bad.sample = False
    with pytest.raises(InvalidStep, match="does not sample"):
        runner.step([bad])


def drafting_step(seq_id: int, token: int, start: int, proposals: int) -> SequenceStep:
    """A decode whose `proposals` the shard makes: its slots cover them."""
    s = step(seq_id, [token] * (1 + proposals), start)
    return replace(s, token_ids=[token], num_proposed=proposals, draft=True)


def test_without_a_draft_model_drafting_steps_propose_by_ngram_lookup(model):
    """A `draft` step on a shard with no draft model: n-gram lookup in the sequence's own tokens makes the
    proposals (none where nothing matches: a plain decode), and the tokens are plain decoding's."""
    plain = new_runner(model)
    ids = [plain.step([step(1, PROMPT, 0, SamplingParams())])[0].token_id]
    for _ in range(24):
        ids.append(plain.step([step(1, [ids[-1]], len(PROMPT) + len(ids) - 1)])[0].token_id)
    # The first decode whose tokens so far repeat a 2-gram: the demo model repeats itself within 24 tokens.
    at = next(i for i in range(len(ids) - 4) if ngram.propose(PROMPT + ids[: i + 1], 3))
    lookup = ngram.propose(PROMPT + ids[: at + 1], 3)

    runner = new_runner(model)
    runner.step([step(1, PROMPT, 0, SamplingParams())])
    for i in range(at):
        runner.step([step(1, [ids[i]], len(PROMPT) + i)])
    (result,) = runner.step([drafting_step(1, ids[at], len(PROMPT) + at, 3)])
    got = [result.token_id] + [t.token_id for t in result.next_tokens]
    assert result.num_drafted == len(lookup)
    assert got == ids[at + 1 : at + 1 + len(got)]
    # A token that is not the sequence's last known one: nothing is proposed, the step is a plain decode.
    other = runner.step([step(2, PROMPT, 0, SamplingParams())])[0].token_id
    (result,) = runner.step([drafting_step(2, (other + 1) % model.config.vocab_size, len(PROMPT), 3)])
    assert (result.num_drafted, result.next_tokens) == (0, [])


def speculate_greedily(runner: ModelRunner, k: int, count: int) -> tuple[list[int], list[tuple[int, int]]]:
    """`count` greedy tokens of PROMPT from n-gram drafting steps that each allow `k` proposals, and each
    drafting step's (proposals made, proposals kept)."""
    ids = [runner.step([step(1, PROMPT, 0, SamplingParams())])[0].token_id]
    verified = []
    while len(ids) < count:
        (result,) = runner.step([drafting_step(1, ids[-1], len(PROMPT) + len(ids) - 1, k)])
        ids += [result.token_id] + [t.token_id for t in result.next_tokens]
        verified.append((result.num_drafted, len(result.next_tokens)))
    return ids[:count], verified


def test_adaptive_proposal_length_follows_what_verifications_kept(model):
    """With the adaptive length (the default) the runner moves a sequence's proposal length after each of
    its verifications (shards/proposal_length.py) and each n-gram lookup proposes at most that; with the
    fixed length it stays unset. The tokens are plain decoding's either way."""
    plain = new_runner(model)
    expected = [plain.step([step(1, PROMPT, 0, SamplingParams())])[0].token_id]
    for _ in range(19):
        expected.append(plain.step([step(1, [expected[-1]], len(PROMPT) + len(expected) - 1)])[0].token_id)
    adaptive_runner, fixed_runner = new_runner(model), new_runner(model, adaptive_length=False)
    adaptive, adaptive_steps = speculate_greedily(adaptive_runner, 3, 20)
    fixed, fixed_steps = speculate_greedily(fixed_runner, 3, 20)
    assert adaptive == fixed == expected
    # The demo's lookups here propose one token at a time, kept and rejected: the length went up and down.
    assert {(1, 1), (1, 0)} <= set(adaptive_steps)
    length = ProposalLength()
    for proposed, kept in adaptive_steps:
        assert proposed <= length.allowed(3)
        if proposed:
            length.on_verified(3, proposed, kept)
    assert adaptive_runner.sequences[1].proposal_length.length == length.length is not None
    assert fixed_runner.sequences[1].proposal_length.length is None
