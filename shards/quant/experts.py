"""Quantized experts: each expert's tensor-parallel slice (or, under expert parallelism, each of this
rank's whole experts) held by bitsandbytes, run sparsely.

The compute is the sort-by-expert grouped path of `shards.layers.moe`: (token, expert) pairs are
sorted by expert and only the experts that received tokens run, so a decode step dequantizes the
weights of at most T K experts instead of all E. Expert ids >= E_l (held by another rank) are skipped.
Legend: T tokens, H hidden size, E_l experts held, K experts per token, I_l intermediate size per rank,
P (token, expert) pairs routed to the experts held.
"""

import torch
import torch.nn.functional as F
from torch import nn

from shards.quant.linear import QuantizedLinear


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
        top_k, held = experts.shape[1], len(self.w13)
        flat = experts.flatten()  # [T K]
        order = flat.argsort(stable=True)  # [T K], grouped by expert, token order kept within one
        counts = torch.bincount(flat, minlength=held).tolist()
        order = order[: sum(counts[:held])]  # [P]: pairs routed elsewhere sort last and are dropped
        token_of = order // top_k
        routed = hidden[token_of]  # [P, H]
        out = torch.empty_like(routed)
        start = 0
        for expert, count in enumerate(counts[:held]):
            if count == 0:
                continue
            end = start + count
            gate, up = self.w13[expert](routed[start:end]).chunk(2, dim=-1)  # [c, I_l] each
            out[start:end] = self.w2[expert](F.silu(gate) * up)  # [c, H]
            start = end
        scaled = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)  # [P, H]
        return torch.zeros_like(hidden).index_add_(0, token_of, scaled)
