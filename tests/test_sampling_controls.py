"""logit_bias and typical sampling on the shards (shards/logits_processors.py) against transformers' warpers,
and prompt scoring in the runner against transformers' MixtralForCausalLM (the teacher-forced oracle)."""

import math

import pytest
import torch
from transformers import MixtralForCausalLM as ReferenceMixtral
from transformers.generation.logits_process import TypicalLogitsWarper

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.logits_processors import apply_logit_bias, mask_typical
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling import sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.token_history import TokenHistory

BLOCK = 4


@pytest.mark.parametrize("mass", [0.05, 0.3, 0.7, 0.95])
def test_typical_keeps_the_set_transformers_keeps(mass):
    generator = torch.Generator().manual_seed(int(mass * 100))
    logits = torch.randn(6, 300, generator=generator) * torch.tensor([0.5, 1, 2, 3, 5, 8])[:, None]
    expected = TypicalLogitsWarper(mass)(None, logits.clone())
    got = mask_typical(logits, torch.full((6,), mass))
    assert torch.equal(got.isinf(), expected.isinf())
    torch.testing.assert_close(got[~got.isinf()], logits[~expected.isinf()])


def test_typical_off_rows_and_minus_inf_entries():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    logits[:, :10] = -math.inf  # removed by an earlier cut
    got = mask_typical(logits, torch.tensor([1.0, 0.5]))
    assert torch.equal(got[0], logits[0])
    assert got[1, :10].isinf().all() and (~got[1].isinf()).sum() >= 1
    expected = TypicalLogitsWarper(0.5)(None, logits[1:].clone())
    assert torch.equal(got[1:].isinf(), expected.isinf())


def test_typical_draws_only_kept_tokens():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 3
    kept = ~TypicalLogitsWarper(0.4)(None, logits.clone()).isinf()[0]
    params = [SamplingParams(temperature=1.0, typical_p=0.4, seed=s) for s in range(40)]
    out = sample(logits.expand(40, -1), params, [TokenHistory() for _ in params], list(range(40)))
    assert kept[out.token_ids].all()


def test_logit_bias_is_added_to_the_tokens_named():
    logits = torch.zeros(3, 10)
    got = apply_logit_bias(logits, [0, 2], [{1: 5.0, 9: -100.0}, {3: 2.5}], 0, 10)
    expected = torch.zeros(3, 10)
    expected[0, 1], expected[0, 9], expected[2, 3] = 5.0, -100.0, 2.5
    torch.testing.assert_close(got, expected)


def test_logit_bias_on_a_vocabulary_slice_skips_other_ranks_tokens_and_padding():
    full = torch.randn(2, 10)
    bias = [{1: 3.0, 6: -4.0, 9: 7.0}, {5: 1.0}]
    whole = apply_logit_bias(full, [0, 1], bias, 0, 10)
    left = apply_logit_bias(full[:, :5], [0, 1], bias, 0, 10)
    right = apply_logit_bias(torch.cat([full[:, 5:], torch.zeros(2, 1)], dim=1), [0, 1], bias, 5, 10)
    torch.testing.assert_close(torch.cat([left, right[:, :5]], dim=1), whole)
    assert right[0, 5] == 0  # padding column 10 is never biased


def test_bias_100_makes_greedy_pick_the_token_and_logprobs_are_of_the_biased_logits():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(0))
    biased = apply_logit_bias(logits, [0], [{7: 100.0}], 0, 20)
    out = sample(biased, [SamplingParams()], [TokenHistory()], [0])
    assert out.token_ids.item() == 7
    torch.testing.assert_close(out.logprobs, biased.log_softmax(-1)[:, 7])


@pytest.mark.parametrize(
    "kwargs, message", [({"typical_p": 1.5}, "typical_p"), ({"logit_bias": {-1: 1.0}}, "logit_bias")]
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# -- prompt scoring in the runner --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    model = load_model(demo_dir, parallel, group)
    runner = ModelRunner(model, parallel, group, torch.device("cpu"), torch.float32, BLOCK)
    runner.allocate_cache(32)
    return runner


@pytest.fixture(scope="module")
def oracle(demo_dir):
    return ReferenceMixtral.from_pretrained(demo_dir, dtype=torch.float32).eval()


PROMPT = [1, 523, 77, 1200, 9, 4000, 31, 88, 2900, 5, 6]
TABLES = {1: [3, 7, 1, 9], 2: [4, 5]}


def _step(seq_id, start, end, sample, score=True, sampling=None):
    table = TABLES[seq_id]
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
    return SequenceStep(seq_id, PROMPT[start:end], start, slots, table, sample, sampling, prompt_logprobs=score)


def _oracle_logprobs(oracle) -> list[float]:
    with torch.no_grad():
        logits = oracle(torch.tensor([PROMPT])).logits[0].float()  # [T, V]
    picked = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None]).squeeze(1)
    return [math.nan, *picked.tolist()]


@pytest.mark.parametrize("chunks", [[(0, 11)], [(0, 4), (4, 9), (9, 11)]])
def test_prompt_logprobs_match_the_teacher_forced_oracle(runner, oracle, chunks):
    expected = _oracle_logprobs(oracle)
    got: list[float] = []
    runner.clear()
    first = True
    for start, end in chunks:
        last = end == len(PROMPT)
        results = runner.step([_step(1, start, end, last, sampling=SamplingParams() if first else None)])
        first = False
        (result,) = results
        assert result.sampled == last and len(result.prompt_logprobs) == end - start
        got.extend(result.prompt_logprobs)
    assert math.isnan(got[0])
    torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(expected[1:]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunks", [[(0, 11)], [(0, 4), (4, 9), (9, 11)]])
def test_prompt_top_tokens_are_the_oracles_best_at_every_position_across_chunks(runner, oracle, chunks):
    with torch.no_grad():
        rows = oracle(torch.tensor([PROMPT])).logits[0, :-1].float().log_softmax(-1)  # [T - 1, V]
    best = rows.topk(3, dim=-1)
    tops: list[list[tuple[int, float]]] = []
    ranks: list[int] = []
    runner.clear()
    for i, (start, end) in enumerate(chunks):
        sampling = SamplingParams(top_n_tokens=3) if i == 0 else None
        (result,) = runner.step([_step(1, start, end, end == len(PROMPT), sampling=sampling)])
        assert len(result.prompt_top_tokens) == len(result.prompt_ranks) == end - start
        tops.extend(result.prompt_top_tokens)
        ranks.extend(result.prompt_ranks)
    # Each token's rank at its position: 1 + the tokens the oracle found more likely (none at position 0).
    own = rows.gather(1, torch.tensor(PROMPT[1:])[:, None])  # [T - 1, 1]
    assert ranks == [0, *((rows > own + 1e-5).sum(dim=-1) + 1).tolist()]
    # Nothing before position 0; a chunk's first position is scored from the chunk before it.
    assert tops[0] == [] and all(len(top) == 3 for top in tops[1:])
    assert [[t for t, _ in top] for top in tops[1:]] == best.indices.tolist()
    got = torch.tensor([[lp for _, lp in top] for top in tops[1:]])
    torch.testing.assert_close(got, best.values, atol=1e-4, rtol=1e-4)


def test_scoring_leaves_the_sampled_token_and_other_sequences_alone(runner):
    runner.clear()
    plain = runner.step([_step(1, 0, 11, True, score=False, sampling=SamplingParams())])
    runner.clear()
    both = runner.step(
        [
            _step(1, 0, 11, True, sampling=SamplingParams()),
            _step(2, 0, 6, False, score=False, sampling=SamplingParams()),
        ]
    )
    assert len(both) == 1 and both[0].token_id == plain[0].token_id
    assert both[0].logprob == pytest.approx(plain[0].logprob, abs=1e-5)
