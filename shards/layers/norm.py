"""RMSNorm, replicated on every rank, computed in fp32 as transformers does."""

import torch
from torch import nn

from shards.checkpoint import CheckpointReader
from shards.kernels import elementwise
from shards.layers.linear import materialize


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = elementwise.rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight = materialize(reader.read(name), self.weight, reader.device)
