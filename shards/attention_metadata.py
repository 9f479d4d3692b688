"""Per-step attention metadata: where each token's K/V goes and which cache blocks each sequence reads.

A step holds the decode tokens of some sequences (one token each, placed first) and the prefill
chunks of others (after them). Built once per step by the runner and shared by every layer.
Legend: T tokens in the step, B_d decoding sequences, M most blocks of any decoding sequence,
P prefill chunks, M_p most blocks of any chunk.
"""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each token's K/V is written to
    num_decode_tokens: int = 0  # the first B_d tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None = None  # [B_d, M], padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [B_d] tokens to attend to, the new one included
    # The prefill chunks, as a varlen kernel reads them: chunk i is the tokens
    # [num_decode_tokens + query_start[i], num_decode_tokens + query_start[i + 1]) of the step, its
    # first token at position start_positions[i]; earlier positions are read from the cache.
    prefill_query_start: torch.Tensor | None = None  # [P + 1] int32, cumulative, from 0
    prefill_start_positions: torch.Tensor | None = None  # [P] int32
    prefill_block_tables: torch.Tensor | None = None  # [P, M_p] int32, padded with block 0
    # The same chunks on the host, (tokens, start position) each: what the torch reference loops over
    # without reading the device tensors back, and what sizes a kernel's grid (its longest chunk).
    prefill_chunks: list[tuple[int, int]] | None = None
    # Every token of the step as one query over its own table [T, M] (padded with block 0) and context
    # [T] (its position + 1): the decoder layer kernel's form of a step with prefill chunks, built by
    # the runner for small steps. A decode-only step has it already in the decode tables.
    token_block_tables: torch.Tensor | None = None
    token_context_lens: torch.Tensor | None = None

    @property
    def num_prefills(self) -> int:
        return 0 if self.prefill_start_positions is None else self.prefill_start_positions.shape[0]

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tables [T, M], context lengths [T]) with every token as one query, or None."""
        if self.token_block_tables is not None:
            return self.token_block_tables, self.token_context_lens
        if not self.num_prefills and self.decode_block_tables is not None:
            return self.decode_block_tables, self.decode_context_lens
        return None

    def tokens(self, start: int, end: int) -> "AttentionMetadata":
        """The step's tokens [start, end) as a step of their own, every token one query over its own table:
        a tile of a step the decoder layer kernel runs in pieces, in order, so that the tokens before
        `start` have written their K/V when these read it. Needs `per_token()`."""
        tables, context_lens = self.per_token()
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[start:end],
            token_block_tables=tables[start:end],
            token_context_lens=context_lens[start:end],
        )
