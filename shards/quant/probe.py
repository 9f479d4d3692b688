"""The start-up check that bitsandbytes can run a quantization mode on this device, in this dtype.

bitsandbytes fails in many ways where it cannot run (no native library for the CUDA version, no
kernel for the device, a dtype it does not compute in); the shard finds out once, before it joins
its group or reads a weight, with one tiny matmul, instead of in the middle of a request.
"""

import torch

from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.linear import quantize_linear

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Far above the probe's expected error (int8 about 1 %, nf4 about 10 %, fp4 about 13 %), far below
# what a kernel that computes garbage gives.
PROBE_MAX_ERROR = 0.3


class QuantizationUnavailable(RuntimeError):
    """bitsandbytes cannot run the requested mode with this dtype on this device."""


def check_supported(config: QuantizationConfig, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize a small weight and run one matmul with it; raise QuantizationUnavailable saying why
    when bitsandbytes cannot, or computes far from the unquantized result."""
    where = f"--quantize {config.mode} with dtype {str(dtype).removeprefix('torch.')} on device {device}"
    if dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
        raise QuantizationUnavailable(f"{where}: bitsandbytes computes only in {names}")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)  # [N, K]: whole 4-bit blocks, whole bytes
    x = torch.randn(2, 128, generator=generator)  # [T, K]
    try:
        layer = quantize_linear(weight, config, dtype, device)
        with torch.inference_mode():
            y = layer(x.to(device=device, dtype=dtype)).float().cpu()  # [T, N]
    # Anything bitsandbytes or the device raises (ImportError, RuntimeError, NotImplementedError,
    # AssertionError from a torch built without CUDA...) means the same thing here.
    except Exception as e:
        raise QuantizationUnavailable(f"{where}: bitsandbytes cannot run it: {type(e).__name__}: {e}") from e
    expected = x @ weight.T
    error = float((y - expected).norm() / expected.norm())
    if not error <= PROBE_MAX_ERROR:
        raise QuantizationUnavailable(
            f"{where}: a test matmul is off by {error:.0%} of its value (at most {PROBE_MAX_ERROR:.0%} expected)"
        )
