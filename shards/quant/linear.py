"""Weights held by bitsandbytes: LLM.int8 (`Linear8bitLt`) and 4-bit nf4/fp4 (`Linear4bit`).

Each is quantized once, at load, from a weight W [N, K] (out, in, as nn.Linear stores it) and
computes y = x W^T for x [T, K]. bitsandbytes is imported on first use: its import takes seconds
and only quantized shards need it. Legend: T tokens, N out features, K in features.
"""

import abc
import functools
import logging
from types import ModuleType

import torch
from torch import nn

from shards.quant.config import QuantizationConfig


@functools.cache
def load_bitsandbytes() -> ModuleType:
    """The bitsandbytes module, imported once."""
    # On CPUs with AVX512-BF16, bitsandbytes warns at import that the optional `kernels` package (a
    # fused 4-bit CPU gemm used only with its CPU-repacked weight layout) is missing. Weights here
    # keep the standard layout, so the warning would only mislead whoever reads the shard log.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb


class QuantizedLinear(nn.Module, abc.ABC):
    """A frozen weight [N, K] stored quantized; calling it on x [T, K] returns x W^T [T, N]."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features

    @abc.abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight holds: the quantized values and the whole quantization state."""

    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] as the quantized values stand for it, in floating point."""

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight and its quantization state, as held on the device."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, nbytes={self.nbytes}"


class Linear8bitLt(QuantizedLinear):
    """LLM.int8: int8 weight rows with one absmax scale each; activations are quantized per token,
    except the columns holding a value >= `threshold`, which meet the dequantized weight columns in
    floating point (the outlier decomposition that keeps large models accurate)."""

    def __init__(self, weight: torch.Tensor, threshold: float) -> None:
        super().__init__(*weight.shape)
        bnb = load_bitsandbytes()
        self.threshold = threshold
        self._quantize_rows = bnb.functional.int8_vectorwise_quant
        self._mixed_mm = torch.ops.bitsandbytes.int8_mixed_scaled_mm
        # From fp16, as bitsandbytes' own Int8Params quantizes.
        self.cb, self.scb, _ = self._quantize_rows(weight.to(torch.float16))  # [N, K] int8, [N] fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # What bitsandbytes' MatMul8bitLt does at inference, without its autograd wrapper, which logs a
        # warning on every call whose input is not fp16.
        ca, sca, outlier_cols = self._quantize_rows(x.to(torch.float16), self.threshold)  # [T, K] int8, [T]
        out, _ = self._mixed_mm(x, ca, self.cb, sca, self.scb, outlier_cols, None)  # [T, N] in x's dtype
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [self.cb, self.scb]

    def dequantize(self) -> torch.Tensor:
        return load_bitsandbytes().functional.int8_vectorwise_dequant(self.cb, self.scb)  # [N, K] fp32


_SHARED_TABLES: dict[tuple, torch.Tensor] = {}


def shared_table(table: torch.Tensor) -> torch.Tensor:
    """One copy per device of each lookup table bitsandbytes gives every 4-bit weight (the 16 nf4 or
    fp4 code values; the 256-entry dynamic map of double-quantized scales: 1 KiB per weight, more
    than a small expert slice's scales). Weight bytes count them never, as they are the same for all."""
    key = (table.device, table.dtype, tuple(table.tolist()))
    return _SHARED_TABLES.setdefault(key, table)


class Linear4bit(QuantizedLinear):
    """4-bit nf4 or fp4 codes, two per byte, with one scale per block of weights."""

    def __init__(self, weight: torch.Tensor, config: QuantizationConfig) -> None:
        super().__init__(*weight.shape)
        bnb = load_bitsandbytes()
        self._matmul = bnb.matmul_4bit
        self.packed, self.quant_state = bnb.functional.quantize_4bit(
            weight,
            blocksize=config.blocksize,
            compress_statistics=config.compress_statistics,
            quant_type=config.quant_type,
        )  # [N K / 2, 1] uint8; the state remembers W's shape and dtype
        state = self.quant_state
        state.code = shared_table(state.code)
        if state.nested:
            state.state2.code = shared_table(state.state2.code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.packed.t(), self.quant_state)  # [T, N]

    def tensors(self) -> list[torch.Tensor]:
        # The lookup tables (state.code, state2.code) are shared by every weight: see shared_table.
        state = self.quant_state
        held = [self.packed, state.absmax]
        if state.nested:
            held += [state.offset, state.state2.absmax]
        return held

    def dequantize(self) -> torch.Tensor:
        return load_bitsandbytes().functional.dequantize_4bit(self.packed, self.quant_state)  # [N, K] in W's dtype


def quantize_linear(
    weight: torch.Tensor, config: QuantizationConfig, dtype: torch.dtype, device: torch.device
) -> QuantizedLinear:
    """Quantize W [N, K] on `device`, from W in the compute `dtype`; the full-precision copy is not kept."""
    weight = weight.to(device=device, dtype=dtype).contiguous()
    if config.quant_type is None:
        return Linear8bitLt(weight, config.threshold)
    return Linear4bit(weight, config)
