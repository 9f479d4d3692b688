"""The row bookkeeping of shards/step_rows.py and speculative.verified_tokens' per-row alternatives."""

import math

import torch

from mixserve.shards.sampling import SampleOutput
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.speculative import verified_tokens
from mixserve.shards.step_rows import SequenceState, consecutive, row_biases
from mixserve.shards.token_history import TokenHistory


def test_consecutive_spans_follow_one_another_from_row_zero():
    assert consecutive([1, 3, 1]) == [range(0, 1), range(1, 4), range(4, 5)]
    assert consecutive([]) == []


def test_row_biases_give_every_row_its_bias_and_the_bans_after_its_own_tokens():
    spans = consecutive([1, 3, 1])  # the middle sequence verifies two proposals, 7 then 8
    steps = [
        SequenceStep(i, tokens, 10, [], [], True, num_proposed=len(tokens) - 1)
        for i, tokens in enumerate([[4], [5, 7, 8], [6]])
    ]
    history = TokenHistory()
    history.add_output([3, 5])
    states = [
        SequenceState(SamplingParams(), TokenHistory()),
        SequenceState(SamplingParams(logit_bias={7: 1.0}, bad_words=[[5, 7], [7, 8, 9], [2]]), history),
        SequenceState(SamplingParams(logit_bias={8: -2.0}), TokenHistory()),
    ]
    at, each = row_biases(spans, steps, states, [1, 2])
    inf = -math.inf
    # Row 1 follows the output ...3, 5; row 2 follows 5, 7; row 3 follows 7, 8.
    assert at == [1, 1, 2, 2, 3, 3, 4]
    assert each == [{7: 1.0}, {7: inf, 2: inf}, {7: 1.0}, {2: inf}, {7: 1.0}, {9: inf, 2: inf}, {8: -2.0}]


def test_verified_tokens_keep_the_alternatives_each_row_asks_for():
    out = SampleOutput(
        token_ids=torch.tensor([3, 4]),
        logprobs=torch.tensor([-0.5, -0.25]),
        top_ids=torch.tensor([[3, 1], [4, 2]]),
        top_logprobs=torch.tensor([[-0.5, -1.0], [-0.25, -2.0]]),
    )
    got = verified_tokens(out, [SamplingParams(top_n_tokens=2), SamplingParams()])
    assert [(t.token_id, t.logprob, t.top_tokens) for t in got] == [(3, -0.5, [(3, -0.5), (1, -1.0)]), (4, -0.25, [])]
    plain = SampleOutput(torch.tensor([3]), torch.tensor([-0.5]), None, None)
    assert [(t.token_id, t.top_tokens) for t in verified_tokens(plain, [SamplingParams()])] == [(3, [])]
