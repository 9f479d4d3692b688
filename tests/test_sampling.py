"""Sampling on a shard: greedy, seeded draws, penalties, logprobs, rank agreement (the top-k/top-p masks:
test_sampling_masks.py)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from mixserve.shards.logits_processors import apply_penalties
from mixserve.shards.sampling import generator_seed, sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.token_history import TokenHistory
from mixserve_pb import shard_pb2


def _run(logits: torch.Tensor, params: list[SamplingParams], keys: list[int], histories=None):
    histories = histories or [TokenHistory() for _ in params]
    return sample(logits, params, histories, keys)


def _counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double()


# -- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", math.nan, "temperature"),
        ("top_k", -1, "top_k"),
        ("top_p", 1.5, "top_p"),
        ("top_p", -0.2, "top_p"),
        ("repetition_penalty", -1.0, "repetition_penalty"),
        ("frequency_penalty", math.inf, "frequency_penalty"),
        ("presence_penalty", math.nan, "presence_penalty"),
        ("seed", -1, "seed"),
        ("seed", 1 << 64, "seed"),
        ("top_n_tokens", -3, "top_n_tokens"),
    ],
)
def test_invalid_params_raise_with_the_field_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_zero_top_p_and_repetition_penalty_mean_off():
    params = SamplingParams(temperature=1.0, top_p=0.0, repetition_penalty=0.0)
    assert params.top_p == 1.0
    assert params.repetition_penalty == 1.0
    assert not params.has_repetition_penalty


def test_from_proto_maps_every_field():
    msg = shard_pb2.SamplingParams(
        temperature=0.5,
        top_k=40,
        top_p=0.75,
        repetition_penalty=1.25,
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        seed=(1 << 64) - 1,
        top_n_tokens=3,
        min_p=0.125,
    )
    expected = SamplingParams(0.5, 40, 0.75, 1.25, 0.5, -0.25, (1 << 64) - 1, 3, min_p=0.125)
    assert SamplingParams.from_proto(msg) == expected
    assert SamplingParams.from_proto(shard_pb2.SamplingParams()).greedy
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_proto(shard_pb2.SamplingParams(top_p=2.0))
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams.from_proto(shard_pb2.SamplingParams(min_p=1.5))


def test_greedy_property():
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert SamplingParams(temperature=1e-9).greedy
    assert not SamplingParams(temperature=0.8).greedy


def test_sample_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one params, history and key per row"):
        sample(torch.zeros(2, 5), [SamplingParams()], [TokenHistory()], [0])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.zeros(5), [SamplingParams()], [TokenHistory()], [0])


# -- greedy and seeded draws ----------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=1, seed=9)] * 3
    out = _run(logits, params, keys=list(range(6)))
    assert out.token_ids.dtype == torch.long
    torch.testing.assert_close(out.token_ids, logits.argmax(dim=-1))


def test_greedy_ties_take_the_lowest_id():
    out = _run(torch.tensor([[0.0, 2.0, 2.0, 1.0]]), [SamplingParams(top_k=1, temperature=1.0)], [0])
    assert out.token_ids.tolist() == [1]


def test_generator_seed_is_splitmix64():
    # splitmix64's first output from state 0 is 0xE220A8397B1DCDAF; generator_seed(0, k) hashes
    # splitmix64(0) ^ k, so k = that output hashes state 0 again.
    assert generator_seed(0, 0xE220A8397B1DCDAF) == 0xE220A8397B1DCDAF
    assert generator_seed(5, 7) != generator_seed(7, 5) != generator_seed(6, 6)
    assert generator_seed(1, -1) == generator_seed(1, (1 << 64) - 1)


def test_same_seed_and_key_give_the_same_token_in_any_batch():
    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(temperature=1.0 + 0.1 * i, top_k=[0, 20][i % 2], top_p=[1.0, 0.9][i // 4], seed=100 + i)
        for i in range(8)
    ]
    params[3] = SamplingParams()
    keys = [17, 3, 3, 99, 0, 5, 1 << 40, 2]
    whole = _run(logits, params, keys).token_ids.tolist()
    assert _run(logits, params, keys).token_ids.tolist() == whole
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = _run(logits[order], [params[i] for i in order], [keys[i] for i in order]).token_ids
    assert shuffled.tolist() == [whole[i] for i in order]
    for i in range(8):
        assert _run(logits[i : i + 1], [params[i]], [keys[i]]).token_ids.tolist() == [whole[i]]


def test_different_seeds_and_keys_draw_independently():
    vocab, n = 16, 400
    logits = torch.zeros(n, vocab)

    def tokens(seed: int, first_key: int) -> torch.Tensor:
        params = [SamplingParams(temperature=1.0, seed=seed)] * n
        return _run(logits, params, list(range(first_key, first_key + n))).token_ids

    base = tokens(seed=7, first_key=1)
    # Uniform over 16 tokens: independent draws agree about 1/16 of the time.
    assert (base == tokens(seed=8, first_key=1)).float().mean() < 0.2
    # Not seed + key: shifting one into the other changes the draws.
    assert (base == tokens(seed=8, first_key=0)).float().mean() < 0.2
    assert (base == tokens(seed=7, first_key=2)).float().mean() < 0.2


def _chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * observed.sum()
    kept = expected > 0
    assert observed[~kept].sum() == 0, "drew a token of probability zero"
    return float(((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum())


def test_frequencies_follow_softmax_of_logits_over_temperature():
    raw = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n, temperature = 4000, 0.7
    params = [SamplingParams(temperature=temperature, seed=1234)] * n
    out = _run(raw.expand(n, -1), params, list(range(n)))
    # 5 degrees of freedom: chi-square above 40 has probability ~1e-7, and the draws are fixed.
    assert _chi_square(_counts(out.token_ids, 6), (raw / temperature).softmax(-1)) < 40


def test_frequencies_after_top_k_follow_the_renormalised_top_k():
    raw = torch.tensor([0.0, 1.5, -0.5, 1.0, 0.5, -2.0])
    n = 3000
    out = _run(raw.expand(n, -1), [SamplingParams(temperature=1.0, top_k=3, seed=5)] * n, list(range(n)))
    expected = torch.zeros(6)
    expected[[1, 3, 4]] = raw[[1, 3, 4]].softmax(-1)
    assert _chi_square(_counts(out.token_ids, 6), expected) < 35


def test_top_p_is_applied_after_temperature():
    raw = torch.tensor([0.10, 0.50, 0.25, 0.15]).log()
    n = 300
    cold = _run(raw.expand(n, -1), [SamplingParams(temperature=1.0, top_p=0.6, seed=3)] * n, list(range(n)))
    assert set(cold.token_ids.tolist()) == {1, 2}
    # At T = 100 the four tokens are near-uniform, so 0.6 of the mass needs three of them.
    hot = _run(raw.expand(n, -1), [SamplingParams(temperature=100.0, top_p=0.6, seed=3)] * n, list(range(n)))
    assert set(hot.token_ids.tolist()) == {1, 2, 3}


def test_removed_and_minus_inf_tokens_are_never_drawn():
    raw = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, -math.inf])
    n = 200
    out = _run(raw.expand(n, -1), [SamplingParams(temperature=2.0, top_p=0.9, seed=11)] * n, list(range(n)))
    assert set(out.token_ids.tolist()) == {1, 3}


def test_a_row_without_a_finite_logit_draws_token_0():
    logits = torch.full((1, 6), -math.inf)
    assert _run(logits, [SamplingParams(temperature=1.0, seed=3)], [0]).token_ids.tolist() == [0]


# -- penalties ------------------------------------------------------------------------------------


def _history(prompt: list[int], output: list[int]) -> TokenHistory:
    history = TokenHistory()
    history.add_prompt(prompt)
    for token in output:
        history.add_output(token)
    return history


def test_repetition_penalty_divides_positive_and_multiplies_negative_once_per_token():
    logits = torch.tensor([[2.0, -1.0, 4.0, 0.0, -3.0, 6.0]])
    history = _history(prompt=[1, 2, 2], output=[2, 3, 4, 4])
    penalised = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [history])
    torch.testing.assert_close(penalised, torch.tensor([[2.0, -2.0, 2.0, 0.0, -6.0, 6.0]]))
    torch.testing.assert_close(logits, torch.tensor([[2.0, -1.0, 4.0, 0.0, -3.0, 6.0]]))


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 8)
    history = _history(prompt=[1, 7, 3], output=[3, 3, 3, 5])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    penalised = apply_penalties(logits, [params], [history])
    expected = torch.zeros(1, 8)
    expected[0, 3] = -(0.5 * 3 + 0.25)
    expected[0, 5] = -(0.5 * 1 + 0.25)
    torch.testing.assert_close(penalised, expected)


def test_penalties_apply_per_row_and_leave_other_rows_alone():
    logits = torch.full((3, 6), 1.0)
    histories = [_history([0], [1, 1]), _history([2], [3]), _history([4], [5])]
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0),
        SamplingParams(),
        SamplingParams(presence_penalty=0.5),
    ]
    penalised = apply_penalties(logits, params, histories)
    expected = torch.full((3, 6), 1.0)
    expected[0, 0] = 0.5
    expected[0, 1] = 0.5 - 2.0
    expected[2, 5] = 0.5
    torch.testing.assert_close(penalised, expected)
    assert apply_penalties(logits, [SamplingParams()] * 3, histories) is logits


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    history = _history(prompt=[], output=[0])
    out = _run(logits, [SamplingParams(repetition_penalty=1.5)], [0], [history])
    assert out.token_ids.tolist() == [1]
    # The reported logprob is of the raw logits, not the penalised ones.
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1)[:, 1])


def test_history_grows_incrementally():
    history = TokenHistory()
    history.add_prompt([5, 6, 5])
    assert history.seen_ids().tolist() == [5, 6]
    assert history.output_ids().tolist() == []
    expected_output = []
    for step in range(100):
        token = step % 7
        history.add_output(token)
        expected_output.append(token)
        if step % 9 == 0:
            assert history.output_ids().tolist() == expected_output
    history.add_output([40, 41])
    assert history.output_ids().tolist() == [*expected_output, 40, 41]
    assert history.seen_ids().tolist() == [5, 6, 0, 1, 2, 3, 4, 40, 41]
    with pytest.raises(ValueError, match=">= 0"):
        history.add_output(-1)


# -- logprobs and top-n ---------------------------------------------------------------------------


def test_logprobs_and_top_n_are_of_the_raw_logits():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    history = _history(prompt=list(range(10)), output=[11, 12])
    params = [
        SamplingParams(temperature=0.5, top_k=10, seed=1, top_n_tokens=2),
        SamplingParams(top_n_tokens=5, repetition_penalty=1.3),
        SamplingParams(temperature=1.5, top_p=0.7, seed=2, frequency_penalty=0.4),
        SamplingParams(temperature=1.0, seed=3),
    ]
    out = sample(logits, params, [history, history, history, TokenHistory()], [4, 4, 4, 4])
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == out.top_logprobs.shape == (4, 5)
    assert out.top_ids.dtype == torch.long
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_ids))
    torch.testing.assert_close(out.top_logprobs, raw.sort(dim=-1, descending=True).values[:, :5])


def test_top_n_is_empty_when_unasked_and_capped_at_the_vocabulary():
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    assert _run(logits, [SamplingParams()] * 2, [0, 0]).top_ids.shape == (2, 0)
    capped = _run(logits, [SamplingParams(top_n_tokens=50), SamplingParams()], [0, 0])
    assert capped.top_ids.shape == (2, 6)
    assert sorted(capped.top_ids[0].tolist()) == list(range(6))


# -- agreement across processes (ranks) -----------------------------------------------------------

_RANK_SCRIPT = """
import json, torch
from mixserve.shards.sampling import sample
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.token_history import TokenHistory
v = torch.arange(24 * 257, dtype=torch.float32).reshape(24, 257)
logits = torch.sin(v * 0.37) * 3 + torch.cos(v * 0.011)
params = [
    SamplingParams(
        temperature=0.3 + 0.1 * i, top_k=[0, 50, 1][i % 3], top_p=[1.0, 0.9, 0.5, 0.95][i % 4],
        repetition_penalty=[1.0, 1.2][i % 2], presence_penalty=0.1 * (i % 3), seed=(i * 7919) << 40,
    )
    for i in range(24)
]
histories = []
for i in range(24):
    h = TokenHistory()
    h.add_prompt(range(i, 257, 5))
    h.add_output([i, i + 1, i])
    histories.append(h)
tokens = sample(logits, params, histories, [1000 + i for i in range(24)]).token_ids.tolist()
print(json.dumps(tokens))
"""


@pytest.mark.slow
def test_separate_processes_draw_identical_tokens():
    ranks = [
        subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [json.loads(rank.communicate(timeout=120)[0]) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    assert outputs[0] == outputs[1]
    namespace: dict = {}
    exec(_RANK_SCRIPT, namespace)
    assert namespace["tokens"] == outputs[0]
    assert len(set(outputs[0])) > 10
