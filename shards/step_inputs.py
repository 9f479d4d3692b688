"""A step's per-sequence chunks as the forward's inputs: token ids, positions, the attention metadata
(slot mapping, block tables, context lengths, prefill chunk bounds) and the rows whose logits the
step needs, on the shard's device.

Decode tokens come first, then the prefill chunks, as the attention ops take them; the logits rows
follow the steps' own order. A sequence's rows are its last token's, or with a speculating step its
last num_proposed + 1 tokens', or when it scores its prompt every token's.

Legend: T tokens in the step, L logits rows, D decode tokens, C prefill chunks, M widest block table.
"""

from dataclasses import dataclass

import torch

from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.host_to_device import to_device
from mixserve.shards.sequence_step import SequenceStep


@dataclass(slots=True)
class StepInputs:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    # [L] int64 rows of the step's tokens; None where they are every token's, in order (a decode step):
    # the model then reads the hidden rows as they are, without an index op.
    logits_indices: torch.Tensor | None


def step_inputs(
    steps: list[SequenceStep], block_size: int, device: torch.device, per_token_max: int, score: bool = False
) -> StepInputs:
    """The forward's inputs for `steps`. A step with prefill chunks of at most `per_token_max` tokens in
    all (the CPU decoder layer kernel's cap; 0: none) also gets one block table row per token (see
    AttentionMetadata); with `score`, a step asking for prompt_logprobs has a logits row per token."""
    order = sorted(range(len(steps)), key=lambda i: len(steps[i].token_ids) != 1)  # decodes first
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[list[int]] = [[] for _ in steps]
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefill_tables: list[list[int]] = []
    prefill_starts: list[int] = []
    query_start = [0]
    total = sum(len(s.token_ids) for s in steps)
    per_token = len(steps) < total <= per_token_max
    token_tables: list[list[int]] = []  # a sequence's table once, repeated for each of its tokens below
    token_counts: list[int] = []
    token_lens: list[int] = []
    for i in order:
        s = steps[i]
        n = len(s.token_ids)
        begin = len(token_ids)
        token_ids.extend(s.token_ids)
        positions.extend(range(s.start_position, s.start_position + n))
        slots.extend(s.slot_mapping)
        if score and s.prompt_logprobs:
            logits_rows[i] = list(range(begin, begin + n))
        else:
            logits_rows[i] = list(range(begin + n - 1 - s.num_proposed, begin + n))
        context = s.start_position + n
        table = s.block_table[: -(-context // block_size)]
        if n == 1:
            decode_tables.append(table)
            decode_lens.append(context)
        else:
            prefill_tables.append(table)
            prefill_starts.append(s.start_position)
            query_start.append(query_start[-1] + n)
        if per_token:
            token_tables.append(table)
            token_counts.append(n)
            token_lens.extend(range(s.start_position + 1, context + 1))
    meta = AttentionMetadata(slot_mapping=to_device(slots, device))
    if prefill_tables:
        meta.prefill_query_start = to_device(query_start, device, torch.int32)  # [C + 1]
        meta.prefill_start_positions = to_device(prefill_starts, device, torch.int32)  # [C]
        meta.prefill_block_tables = padded(prefill_tables, device, torch.int32)  # [C, M]
        meta.prefill_chunks = [(query_start[i + 1] - query_start[i], start) for i, start in enumerate(prefill_starts)]
    if decode_tables:
        meta.num_decode_tokens = len(decode_tables)
        meta.decode_block_tables = padded(decode_tables, device)  # [D, M]
        meta.decode_context_lens = to_device(decode_lens, device)  # [D]
    if per_token:
        repeats = to_device(token_counts, device)
        meta.token_block_tables = padded(token_tables, device).repeat_interleave(
            repeats, 0, output_size=total
        )  # [T, M]
        meta.token_context_lens = to_device(token_lens, device)  # [T]
    rows = [row for rows in logits_rows for row in rows]
    every = len(rows) == len(token_ids) and rows == list(range(len(rows)))
    return StepInputs(
        to_device(token_ids, device), to_device(positions, device), meta, None if every else to_device(rows, device)
    )


def padded(tables: list[list[int]], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Block tables as one [rows, widest] tensor, the shorter rows padded with block 0."""
    width = max(len(t) for t in tables)
    return to_device([t + [0] * (width - len(t)) for t in tables], device, dtype)
