"""What a scheduler step holds: the config's validation, a prompt's prefill then its decodes, a long
prompt chunked beside running decodes, running prefills before admissions, FIFO admission and the
running-requests cap (tests/scheduler_harness.py checks every step's promises to the shards)."""

import pytest
from scheduler_harness import Harness, new_seq

from mixserve.router.scheduler import SchedulerConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_blocks": 0},
        {"block_size": 0},
        {"max_batch_prefill_tokens": 0},
        {"max_running_requests": 0},
        {"max_batch_total_tokens": 3},
    ],
)
def test_config_is_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**{"num_blocks": 8, "block_size": 4, **kwargs})


def test_one_request_prefills_then_decodes() -> None:
    h = Harness(num_blocks=8, block_size=4)
    seq = h.add(new_seq(1, prompt_len=10, max_new_tokens=4))
    plans = h.run_all()
    assert [(p.num_prefill_tokens, p.num_decode_tokens) for p in plans] == [(10, 0), (0, 1), (0, 1), (0, 1)]
    prefill = plans[0].sequences[0]
    assert prefill.sample and prefill.is_prefill and prefill.start_position == 0
    assert prefill.slot_mapping == [b * 4 + o for b in prefill.block_table for o in range(4)][:10]
    # The first token comes from the prefill; each decode feeds the one before it.
    assert [p.sequences[0].token_ids for p in plans[1:]] == [[t] for t in seq.output_ids[:3]]
    assert [p.sequences[0].start_position for p in plans[1:]] == [10, 11, 12]
    h.assert_complete()


def test_long_prompt_is_chunked_while_running_sequences_keep_decoding() -> None:
    h = Harness(num_blocks=64, block_size=4, max_batch_prefill_tokens=8)
    streaming = h.add(new_seq(1, prompt_len=4, max_new_tokens=20))
    h.step()
    long = h.add(new_seq(2, prompt_len=30, max_new_tokens=2))
    chunks = []
    while long.num_computed < len(long.prompt_ids):
        plan = h.step()
        assert [e.seq for e in plan.sequences if not e.is_prefill] == [streaming]
        (chunk,) = [e for e in plan.sequences if e.is_prefill]
        chunks.append((chunk.start_position, len(chunk.token_ids), chunk.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]
    assert len(long.output_ids) == 1
    h.run_all()
    h.assert_complete()


def test_running_prefills_go_before_admissions_and_admission_is_fifo() -> None:
    h = Harness(num_blocks=64, block_size=4, max_batch_prefill_tokens=8)
    for seq_id, prompt_len in [(1, 20), (2, 5), (3, 3)]:
        h.add(new_seq(seq_id, prompt_len, 2))
    plans = h.run_all()
    shape = [[(e.seq.seq_id, len(e.token_ids)) for e in p.sequences] for p in plans[:4]]
    assert shape == [
        [(1, 8)],
        [(1, 8)],
        [(1, 4), (2, 4)],
        [(1, 1), (2, 1), (3, 3)],
    ]
    h.assert_complete()


def test_max_running_requests_caps_the_batch() -> None:
    h = Harness(max_running_requests=2)
    for seq_id in range(5):
        h.add(new_seq(seq_id, 3, 4))
    for plan in h.run_all():
        assert len(plan.sequences) <= 2
    h.assert_complete()
