"""Weights held by bitsandbytes: LLM.int8 (`Linear8bitLt`) and 4-bit nf4/fp4 (`Linear4bit`).

Each is quantized once, at load, from a weight W [N, K] (out, in, as nn.Linear stores it) and
computes y = x W^T for x [T, K]. bitsandbytes is imported on first use: its import takes seconds
and only quantized shards need it. Legend: T tokens, N out features, K in features, O outlier columns.

bitsandbytes 0.50 is the oldest release with what this uses: its `torch.ops.bitsandbytes` int8 ops
arrived in 0.46, and 0.50 added `gemm_4bit`, the fused 4-bit kernel for more than one row that
`matmul_4bit` calls on CUDA (before it, several rows dequantized the whole weight on every call).
"""

import abc
import functools
import logging
from types import ModuleType
from typing import Literal

import torch
from torch import nn

from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.int8_weight import Int8Weight


@functools.cache
def load_bitsandbytes() -> ModuleType:
    """The bitsandbytes module, imported once."""
    # On CPUs with AVX512-BF16, bitsandbytes warns at import that the optional `kernels` package (a
    # fused 4-bit CPU gemm used only with its CPU-repacked weight layout) is missing. Weights here
    # keep the standard layout, so the warning would only mislead whoever reads the shard log.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # At import bitsandbytes wraps four device-independent functions in torch.compile (its optimizers'
    # steps, and the blockwise and 4-bit dequantization that its C and CUDA kernels replace), and the
    # first torch.compile call imports inductor's compiler: from the import to a first int8 and nf4
    # layer 4.1-4.4 s with it, 2.2-2.4 s without, on a 2-core AMD EPYC (benchmarks/results/bnb-import;
    # its first op imports dynamo either way). A shard runs those functions only where its device lacks
    # the kernel (on the CPU: 4-bit blocks of 2048 and more on AVX-512), so they are imported as the eager
    # functions bitsandbytes itself falls back to where compiling fails.
    compile_ = torch.compile
    torch.compile = _eager
    try:
        import bitsandbytes as bnb
    finally:
        torch.compile = compile_
    return bnb


def _eager(model=None, **options):
    """torch.compile's signature, compiling nothing (load_bitsandbytes)."""
    return model if model is not None else (lambda fn: fn)


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


def quantize_rows(a: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8's row-wise quantization of a [T, K], in fp32: int8 codes [T, K], each row's absmax [T]
    and the outlier columns [O] (those holding a value >= `threshold`; 0: none), whose codes are 0.

    bitsandbytes' own int8_vectorwise_quant takes only fp16 on CUDA, where activations past 65504
    (they occur in large models' residual stream) become inf; fp32 keeps them."""
    a = a.float()
    outlier_cols = torch.empty(0, dtype=torch.long, device=a.device)
    if threshold > 0:
        outliers = a.abs() >= threshold  # [T, K]
        outlier_cols = outliers.any(dim=0).nonzero().flatten()  # [O]
        a = a.masked_fill(outliers.any(dim=0), 0.0)
    absmax = a.abs().amax(dim=1)  # [T]
    codes = torch.round(a * (127.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(1))
    return codes.to(torch.int8), absmax, outlier_cols


class Linear8bitLt(QuantizedLinear):
    """LLM.int8: int8 weight rows with one absmax scale each; activations are quantized per token,
    except the columns holding a value >= `threshold`, which meet the dequantized weight columns in
    floating point (the outlier decomposition that keeps large models accurate)."""

    def __init__(self, weight: torch.Tensor, threshold: float) -> None:
        super().__init__(*weight.shape)
        load_bitsandbytes()  # registers torch.ops.bitsandbytes
        self.threshold = threshold
        self._int8_matmul = torch.ops.bitsandbytes.int8_linear_matmul
        self.cb, self.scb, _ = quantize_rows(weight)  # [N, K] int8, [N] fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' MatMul8bitLt, with the scaling in fp32: its int8_mm_dequant writes fp16 on CUDA.
        ca, sca, outlier_cols = quantize_rows(x, self.threshold)  # [T, K] int8, [T], [O]
        acc = self._int8_matmul(ca, self.cb)  # [T, N] int32
        out = acc.float() * (sca.unsqueeze(1) * self.scb.unsqueeze(0) / (127.0 * 127.0))  # [T, N] fp32
        if outlier_cols.numel():
            w_cols = self.cb[:, outlier_cols].float() * (self.scb.unsqueeze(1) / 127.0)  # [N, O]
            out.addmm_(x[:, outlier_cols].float(), w_cols.t())
        return out.to(x.dtype)

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


FourBitPath = Literal["fused", "dequantize"]


class Linear4bit(QuantizedLinear):
    """4-bit nf4 or fp4 codes, two per byte, with one scale per block of weights.

    Two ways to compute x W^T, chosen per call (a benchmark times both): `fused`, bitsandbytes'
    matmul_4bit, whose CUDA kernels read the codes in place (gemv for one row, gemm_4bit for up to
    1536 rows; past that, or on CPU, it dequantizes itself); `dequantize`, the whole weight to x's
    dtype, then one GEMM (the reference, and the baseline the fused kernels must beat)."""

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

    def forward(self, x: torch.Tensor, path: FourBitPath = "fused") -> torch.Tensor:
        if path == "fused":
            return self._matmul(x, self.packed.t(), self.quant_state)  # [T, N]
        if path == "dequantize":
            return torch.nn.functional.linear(x, self.dequantize().to(x.dtype))  # [T, N]
        raise ValueError(f"4-bit path {path!r} is not fused or dequantize")

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
    """Quantize W [N, K] on `device`, from W in the compute `dtype` (int8-wo: from the checkpoint's W, in
    fp32); the full-precision copy is not kept."""
    if config.weight_only_int8:
        from mixserve.shards.quant.int8_layers import Int8Linear  # which subclasses this module's QuantizedLinear

        return Int8Linear(Int8Weight.quantize(weight.to(device)))
    weight = weight.to(device=device, dtype=dtype).contiguous()
    if config.quant_type is None:
        return Linear8bitLt(weight, config.threshold)
    return Linear4bit(weight, config)
