"""Build the sharded model on the meta device and fill it with this rank's slice of the checkpoint."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.dummy_weights import DummyCheckpointReader
from mixserve.shards.model import MixtralForCausalLM
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.int8_layers import Int8Experts
from mixserve.shards.quant.linear import QuantizedLinear
from mixserve.shards.quant.probe import check_supported

log = logging.getLogger(__name__)

# auto: the safetensors checkpoint; dummy: random weights of its shapes (shards/dummy_weights.py).
LOAD_FORMATS = ("auto", "dummy")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (their own class kept: a
    bitsandbytes parameter stays one), while buffers computed at construction (rotary's tables) stay
    real; the checkpoint then fills every parameter. accelerate's `init_empty_weights` does the same,
    but importing accelerate costs a shard ~1 s of its start."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            attributes = dict(param.__dict__, requires_grad=param.requires_grad)
            module._parameters[name] = type(param)(param.to("meta"), **attributes)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_model(
    model_dir: str | Path,
    parallel: ParallelConfig,
    group: TensorParallelGroup,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: QuantizationConfig | None = None,
    load_format: str = "auto",
    seed: int = 0,
) -> MixtralForCausalLM:
    """The model for rank `parallel.rank`, holding only that rank's slice of each weight (with
    `parallel.moe_parallel` ep: only its own experts, whole).

    Raises ValueError, before reading any weight, where the model cannot be split that way.

    With `quantization`, raises QuantizationUnavailable before reading any weight where bitsandbytes
    cannot run that mode with `dtype` on `device`.

    `load_format` dummy fills the weights with random values of the checkpoint's shapes (seeded by
    `seed`), made on `device`, from config.json alone.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    config = ModelConfig.from_pretrained(model_dir)
    parallel.check(config)
    if quantization is not None:
        check_supported(quantization, dtype, torch.device(device))
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with parameters_on_meta():
            model = MixtralForCausalLM(config, parallel, group, quantization)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        reader = DummyCheckpointReader(model_dir, device, dtype, seed)
    else:
        reader = CheckpointReader(model_dir, device)
    try:
        model.load(reader)
    finally:
        reader.close()
    left_on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"parameters not loaded from the checkpoint: {left_on_meta[:5]}")
    model.eval()
    log.info(
        "event=model_loaded load_format=%s rank=%d world_size=%d moe_parallel=%s dtype=%s quantize=%s device=%s "
        "weight_bytes=%d bytes_read=%d seconds=%.2f",
        load_format,
        parallel.rank,
        parallel.world_size,
        parallel.moe_parallel,
        str(dtype).removeprefix("torch."),
        quantization.mode if quantization else "none",
        device,
        weight_bytes(model),
        reader.bytes_read,
        time.perf_counter() - started,
    )
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's weights on this rank: its parameters, and its quantized weights
    with their quantization state."""
    quantized = sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear | Int8Experts))
    return sum(p.numel() * p.element_size() for p in model.parameters()) + quantized
