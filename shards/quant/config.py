"""The `--quantize` modes and their settings (no torch here: the router reads these names)."""

from dataclasses import dataclass

# Weight-only int8 on the CPU: codes read in place by the C kernels (shards/quant/int8_weight.py).
INT8_WEIGHT_ONLY = "int8-wo"
BITSANDBYTES_MODES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
QUANTIZE_MODES = (*BITSANDBYTES_MODES, INT8_WEIGHT_ONLY)
FOUR_BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(slots=True, frozen=True)
class QuantizationConfig:
    """How a shard holds its attention projections and experts (and, for int8-wo, its LM head).

    `int8-wo` is weight-only int8 for the CPU: every linear weight (q/k/v/o, the experts' w1/w2/w3,
    the LM head) as int8 codes with one fp32 scale per output channel (symmetric, absmax / 127),
    quantized at load; activations stay in the model's dtype, so the C kernels read a quarter of
    fp32's weight bytes per decode step. `bitsandbytes` is LLM.int8: int8 weight rows with one scale
    each; per token, the activation columns holding a value at or above `threshold` go through in
    floating point. `bitsandbytes-nf4` and `bitsandbytes-fp4` store 4-bit codes with one scale per
    `blocksize` weights, and with `compress_statistics` those scales are themselves 8-bit
    (bitsandbytes' double quantization).
    """

    mode: str
    threshold: float = 6.0
    blocksize: int = 64
    compress_statistics: bool = True

    def __post_init__(self) -> None:
        if self.mode not in QUANTIZE_MODES:
            raise ValueError(f"quantize {self.mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
        if self.threshold < 0:
            raise ValueError(f"LLM.int8 threshold must be >= 0, got {self.threshold}")
        if self.blocksize not in FOUR_BIT_BLOCKSIZES:
            raise ValueError(f"4-bit blocksize must be one of {FOUR_BIT_BLOCKSIZES}, got {self.blocksize}")

    @property
    def weight_only_int8(self) -> bool:
        """Whether this is int8-wo (no bitsandbytes; the LM head is quantized too)."""
        return self.mode == INT8_WEIGHT_ONLY

    @property
    def quant_type(self) -> str | None:
        """`nf4` or `fp4` for the 4-bit modes, None for LLM.int8 and int8-wo."""
        return None if self.mode in ("bitsandbytes", INT8_WEIGHT_ONLY) else self.mode.removeprefix("bitsandbytes-")
