"""The row bookkeeping of shards/step_rows.py and speculative.verified_tokens' per-row alternatives."""

import torch

from mixserve.shards.sampling import SampleOutput
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.speculative import verified_tokens
from mixserve.shards.step_rows import consecutive, span_rows


def test_consecutive_spans_follow_one_another_from_row_zero():
    assert consecutive([1, 3, 1]) == [range(0, 1), range(1, 4), range(4, 5)]
    assert consecutive([]) == []


def test_span_rows_gives_every_row_of_each_biased_sequence_its_bias():
    spans = consecutive([1, 3, 1])  # the middle sequence speculates two tokens
    at, each = span_rows(spans, [1, 2], [{7: 1.0}, {8: -2.0}])
    assert at == [1, 2, 3, 4]
    assert each == [{7: 1.0}] * 3 + [{8: -2.0}]


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
