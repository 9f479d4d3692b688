"""A step's chunks as the forward's inputs (shards/step_inputs.py): decodes first, logits rows in the
steps' order, per-token tables within the kernel's cap, no index where every token is a row."""

import torch

from mixserve.shards.sequence_step import SequenceStep
from mixserve.shards.step_inputs import step_inputs

CPU = torch.device("cpu")
BLOCK = 4


def _step(seq_id: int, tokens: list[int], start: int, table: list[int], **kwargs) -> SequenceStep:
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + len(tokens))]
    return SequenceStep(seq_id, tokens, start, slots, table, **kwargs)


def test_decodes_alone_take_every_row_without_an_index():
    steps = [_step(0, [7], 5, [2, 3]), _step(1, [8], 0, [9])]
    inputs = step_inputs(steps, BLOCK, CPU, per_token_max=0)
    assert inputs.logits_indices is None
    assert inputs.token_ids.tolist() == [7, 8] and inputs.positions.tolist() == [5, 0]
    assert inputs.meta.slot_mapping.tolist() == [13, 36]
    assert inputs.meta.num_decode_tokens == 2 and inputs.meta.num_prefills == 0
    assert inputs.meta.decode_block_tables.tolist() == [[2, 3], [9, 0]]  # the shorter row padded with block 0
    assert inputs.meta.decode_context_lens.tolist() == [6, 1]


def test_a_mixed_step_puts_decodes_first_and_keeps_the_steps_order_for_logits():
    steps = [
        _step(0, [1, 2, 3], 0, [4]),  # a prefill chunk: its last token's row
        _step(1, [5], 9, [6, 7, 8]),  # a decode
        _step(2, [9, 10, 11], 2, [1, 3]),  # a verification of two proposals: three rows
    ]
    steps[2].num_proposed = 2
    inputs = step_inputs(steps, BLOCK, CPU, per_token_max=0)
    assert inputs.token_ids.tolist() == [5, 1, 2, 3, 9, 10, 11]
    assert inputs.logits_indices.tolist() == [3, 0, 4, 5, 6]
    assert inputs.meta.prefill_query_start.tolist() == [0, 3, 6]
    assert inputs.meta.prefill_chunks == [(3, 0), (3, 2)]
    assert inputs.meta.token_block_tables is None  # no kernel cap given: no per-token rows


def test_scoring_rows_and_per_token_tables_within_the_cap():
    steps = [_step(0, [1, 2, 3], 0, [4], prompt_logprobs=True), _step(1, [5], 1, [6])]
    inputs = step_inputs(steps, BLOCK, CPU, per_token_max=4, score=True)
    assert inputs.logits_indices.tolist() == [1, 2, 3, 0]
    tables, lens = inputs.meta.per_token()
    assert tables.tolist() == [[6], [4], [4], [4]] and lens.tolist() == [2, 1, 2, 3]
    assert step_inputs(steps, BLOCK, CPU, per_token_max=3, score=True).meta.token_block_tables is None
