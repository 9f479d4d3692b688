"""RMSNorm, replicated on every rank, computed in fp32 as transformers does (the `rms_norm` op)."""

import torch
from torch import nn

from mixserve.shards import ops
from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.layers.linear import materialize


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The norm of x [T, H]; with `residual`, (the norm of x + residual, x + residual)."""
        return ops.current().rms_norm(x, self.weight, self.eps, residual)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight = materialize(reader.read(name), self.weight, reader.device)
