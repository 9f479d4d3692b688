"""Weight-only int8 layers (`--quantize int8-wo`): a linear weight and a stack of experts held as
`Int8Weight`s, run through the shard's ops like full-precision weights (the C kernels read the codes
in place at decode sizes; the torch reference dequantizes on the fly past them).

Legend: T tokens, N out features, K in features, H hidden size, E_l experts held, I_l intermediate
size held, K_e experts per token.
"""

import torch
from torch import nn

from mixserve.shards import ops
from mixserve.shards.quant.int8_weight import Int8Weight
from mixserve.shards.quant.linear import QuantizedLinear


class Int8Linear(QuantizedLinear):
    """y = x W^T for a weight [N, K] held as int8 codes with per-row scales."""

    def __init__(self, weight: Int8Weight) -> None:
        super().__init__(*weight.shape)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.current().linear_rows(x, self.weight)  # [T, N]

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight.codes, self.weight.scale]

    def dequantize(self) -> torch.Tensor:
        return self.weight.dequantize()  # [N, K] fp32


class Int8Experts(nn.Module):
    """Every expert held, stacked as the full-precision experts are: w13 [E_l, 2 I_l, H] (w1 over w3)
    and w2 [E_l, H, I_l], each an Int8Weight with per-row scales."""

    def __init__(self, w13: Int8Weight, w2: Int8Weight) -> None:
        super().__init__()
        if w13.shape[0] != w2.shape[0]:
            raise ValueError(f"w13 holds {w13.shape[0]} experts but w2 {w2.shape[0]}")
        self.w13 = w13
        self.w2 = w2

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """This rank's partial MoE output [T, H] for hidden [T, H], routing weights and expert ids [T, K_e]."""
        return ops.current().fused_moe(hidden, self.w13, self.w2, weights, experts)

    @classmethod
    def stacked(cls, w13: list[Int8Weight], w2: list[Int8Weight]) -> "Int8Experts":
        """The experts from one Int8Weight per expert each: w13 [2 I_l, H] and w2 [H, I_l]."""
        if not w13 or len(w13) != len(w2):
            raise ValueError(f"{len(w13)} w13 weights but {len(w2)} w2 weights")

        def stack(weights: list[Int8Weight]) -> Int8Weight:
            return Int8Weight(torch.stack([w.codes for w in weights]), torch.stack([w.scale for w in weights]))

        return cls(stack(w13), stack(w2))

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales of both stacks."""
        return self.w13.nbytes + self.w2.nbytes

    def extra_repr(self) -> str:
        return f"w13={tuple(self.w13.shape)}, w2={tuple(self.w2.shape)}, nbytes={self.nbytes}"
