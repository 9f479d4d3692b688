"""Quantized experts: each expert's tensor-parallel slice (or, under expert parallelism, each of this
rank's whole experts) held by bitsandbytes, run sparsely.

The compute is the sort-by-expert grouped path (`shards.layers.grouped_experts`): (token, expert) pairs are
sorted by expert and only the experts that received tokens run, so a decode step dequantizes the
weights of at most T K experts instead of all E. Expert ids >= E_l (held by another rank) are skipped.
Legend: T tokens, H hidden size, E_l experts held, K experts per token, I_l intermediate size per rank,
P (token, expert) pairs routed to the experts held.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.shards.layers.grouped_experts import run_grouped
from mixserve.shards.quant.linear import QuantizedLinear


class QuantizedExperts(nn.Module):
    """w13 (w1 and w3 merged, [2 I_l, H]) and w2 ([H, I_l]) of every expert, one quantized weight each."""

    def __init__(self, w13: list[QuantizedLinear], w2: list[QuantizedLinear]) -> None:
        super().__init__()
        if len(w13) != len(w2):
            raise ValueError(f"{len(w13)} w13 weights but {len(w2)} w2 weights")
        self.w13 = nn.ModuleList(w13)
        self.w2 = nn.ModuleList(w2)

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """This rank's partial MoE output [T, H] for hidden [T, H], routing weights and expert ids [T, K]."""

        def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = self.w13[expert](rows).chunk(2, dim=-1)  # [c, I_l] each
            return self.w2[expert](F.silu(gate) * up)  # [c, H]

        return run_grouped(hidden, weights, experts, len(self.w13), expert_mlp)
