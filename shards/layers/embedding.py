"""Vocabulary-parallel embedding and lm_head: each rank holds a contiguous range of token rows.

The vocabulary is padded up to a multiple of the world size, so any vocab size splits; the padding
rows are zero and the padded logits are cut off after the gather.
Legend: T tokens, H hidden size, V vocab size, P = ceil(V / n) rows per rank.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.shards import ops
from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.layers.linear import materialize


class _VocabSlice(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelConfig, group: TensorParallelGroup):
        super().__init__()
        self.vocab_size = vocab_size
        self.parallel = parallel
        self.group = group
        self.rows_per_rank = -(-vocab_size // parallel.world_size)
        self.vocab_start = parallel.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)  # [P, H]

    def load(self, reader: CheckpointReader, name: str) -> None:
        rows = reader.read(name, dim=0, start=self.vocab_start, end=self.vocab_end)
        padded = torch.zeros(self.rows_per_rank, rows.shape[1], dtype=rows.dtype)
        padded[: rows.shape[0]] = rows
        self.weight = materialize(padded, self.weight, reader.device)


class VocabParallelEmbedding(_VocabSlice):
    """Token embedding; rows outside this rank's range contribute zeros to the all-reduce."""

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(token_ids, self.weight)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)  # [T]
        local = (token_ids - self.vocab_start).masked_fill(outside, 0)
        embeds = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)  # [T, H]
        return self.group.all_reduce(embeds)


class ParallelLMHead(_VocabSlice):
    """Output projection; every rank ends with the full gathered logits, or with its own slice [T, P]
    (`gather=False`, column j is token vocab_start + j) for a caller that combines the slices itself."""

    def forward(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        local = ops.current().linear_rows(hidden, self.weight)  # [T, P]
        return self.gather(local) if gather else local

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's slice [T, P] joined into the full logits [T, V]."""
        return self.group.all_gather_last_dim(local)[..., : self.vocab_size]
