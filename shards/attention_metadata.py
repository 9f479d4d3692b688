"""Per-step attention metadata: where each token's K/V goes and which cache blocks each sequence reads.

A step holds the decode tokens of some sequences (one token each, placed first) and the prefill
chunks of others (after them). Built once per step by the runner and shared by every layer.
Legend: T tokens in the step, B_d decoding sequences, M most blocks of any decoding sequence.
"""

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's chunk of prompt tokens: tokens [token_start, token_end) of the step."""

    token_start: int
    token_end: int
    start_position: int  # position of the chunk's first token; earlier ones are cached
    block_table: torch.Tensor  # [blocks covering start_position + chunk length]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each token's K/V is written to
    num_decode_tokens: int = 0  # the first B_d tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None = None  # [B_d, M], padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [B_d] tokens to attend to, the new one included
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Every token of the step as one query over its own table [T, M] (padded with block 0) and context
    # [T] (its position + 1): the decoder layer kernel's form of a step with prefill chunks, built by
    # the runner for small steps. A decode-only step has it already in the decode tables.
    token_block_tables: torch.Tensor | None = None
    token_context_lens: torch.Tensor | None = None

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tables [T, M], context lengths [T]) with every token as one query, or None."""
        if self.token_block_tables is not None:
            return self.token_block_tables, self.token_context_lens
        if not self.prefills and self.decode_block_tables is not None:
            return self.decode_block_tables, self.decode_context_lens
        return None
