"""Weight-only int8 (`--quantize int8-wo`): a weight held as int8 codes with one fp32 scale per output
channel (symmetric, absmax / 127), what the CPU kernels read in place and the torch reference
dequantizes on the fly. torch only: the kernels' checks and the reference ops import it.

Legend: N output channels (rows), K input features; `...` leading dimensions (experts: [E, N, K]).
"""

from dataclasses import dataclass

import torch

# Codes lie in [-127, 127]: symmetric, so -128 is never used and a row's absmax maps to exactly +-127.
CODE_MAX = 127.0


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """A weight [..., N, K] whose row n stands for codes[..., n, :] * scale[..., n]."""

    codes: torch.Tensor  # [..., N, K] int8
    scale: torch.Tensor  # [..., N] fp32

    def __post_init__(self) -> None:
        if self.codes.dtype is not torch.int8 or self.scale.dtype is not torch.float32:
            raise TypeError(
                f"int8 weight: codes must be int8 and scale float32, got {self.codes.dtype} and {self.scale.dtype}"
            )
        if self.codes.dim() < 2 or self.scale.shape != self.codes.shape[:-1]:
            raise ValueError(
                f"int8 weight: scale {tuple(self.scale.shape)} must hold one value per row of codes "
                f"{tuple(self.codes.shape)}"
            )

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Weight":
        """Per-row symmetric quantization of a floating-point weight [..., N, K], computed in fp32: a
        row of zeros gets scale 0 and codes 0."""
        weight = weight.float()
        scale = weight.abs().amax(dim=-1) / CODE_MAX  # [..., N]
        codes = torch.round(weight / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
        return cls(codes.clamp_(-CODE_MAX, CODE_MAX).to(torch.int8).contiguous(), scale.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [..., N, K] the codes stand for, computed in fp32, returned in `dtype`."""
        return (self.codes.float() * self.scale.unsqueeze(-1)).to(dtype)

    def __getitem__(self, index: int | slice) -> "Int8Weight":
        """The weight of a leading index (one expert of a stacked [E, N, K], or a range of them)."""
        return Int8Weight(self.codes[index], self.scale[index])

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def dtype(self) -> torch.dtype:
        """int8: what a backend that checks weight dtypes sees (those that cannot read it fall back)."""
        return torch.int8

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and the scales."""
        return self.codes.numel() + self.scale.numel() * self.scale.element_size()


def dense(weight: "torch.Tensor | Int8Weight", dtype: torch.dtype) -> torch.Tensor:
    """A floating-point weight as it is, an int8 one dequantized to `dtype` (the reference's path)."""
    return weight.dequantize(dtype) if isinstance(weight, Int8Weight) else weight
