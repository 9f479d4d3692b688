"""Which device and dtype a shard computes on, from `--device` / `--dtype` and what this host has.

A shard on a CUDA host uses `cuda:<local rank>`: the launcher gives each shard group its own GPUs
through CUDA_VISIBLE_DEVICES and each shard LOCAL_RANK (torchrun sets it too), so rank r of any
group is `cuda:r` among the GPUs it sees. The same rules serve the shard at start-up and the
launcher's host check (shards/preflight.py), so both refuse a combination alike.
"""

import torch

from mixserve.shards.config import DTYPES
from mixserve.shards.kernels import native

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# What a CPU shard's KV cache may hold whatever the model's dtype: what the C kernels read and store.
KV_CACHE_DTYPES = ("float32", "bfloat16")


class DeviceUnavailable(ValueError):
    """The requested device or dtype cannot be had on this host."""


def resolve_device(name: str, local_rank: int) -> torch.device:
    """`--device` for the shard of `local_rank` on this host: `cpu`; `cuda` (GPU `local_rank`);
    `cuda:N` (GPU N); `auto` (like `cuda` when torch sees a GPU, else `cpu`)."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "auto" and name != "cuda" and not name.startswith("cuda:"):
        raise DeviceUnavailable(f"--device {name}: not one of {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise DeviceUnavailable(
            f"--device {name}: torch {torch.__version__} sees no CUDA GPU here "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    count = torch.cuda.device_count()
    if name.startswith("cuda:"):
        index_text = name.removeprefix("cuda:")
        if not index_text.isdigit():
            raise DeviceUnavailable(f"--device {name}: not one of {DEVICE_CHOICES}")
        index = int(index_text)
    else:
        index = local_rank
    if index >= count:
        raise DeviceUnavailable(
            f"--device {name}: GPU {index} (local rank {local_rank}) is not among the {count} this process sees "
            "(CUDA_VISIBLE_DEVICES, LOCAL_RANK)"
        )
    return torch.device("cuda", index)


def cpu_has_bf16() -> bool:
    """Whether this host's CPU has the AVX-512 bf16 instructions (`avx512_bf16` in /proc/cpuinfo): a
    CPU built for bf16, where the C kernels read bf16 weights at half fp32's bytes."""
    return _cpu_flag("avx512_bf16")


def cpu_has_amx_bf16() -> bool:
    """Whether this host's CPU has AMX's bf16 tile dot product (`amx_bf16` in /proc/cpuinfo)."""
    return _cpu_flag("amx_bf16")


def _cpu_flag(name: str) -> bool:
    """Whether /proc/cpuinfo's flags name `name` (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and name in line.split() for line in f)
    except OSError:
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype` on `device`: `auto` is bfloat16 on a CPU with avx512_bf16 and a C compiler for the kernels
    that read bf16 weights in place (half fp32's bytes; served against fp32 in benchmarks/RESULTS.md),
    float32 on other CPUs; bfloat16 on a GPU that has it (else float16)."""
    if name != "auto" and name not in DTYPES:
        raise DeviceUnavailable(f"--dtype {name}: not one of auto, {', '.join(DTYPES)}")
    if device.type != "cuda":
        if name == "auto":
            return torch.bfloat16 if cpu_has_bf16() and native.compiler_available() else torch.float32
        return DTYPES[name]
    bf16 = torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float16
    if name == "bfloat16" and not bf16:
        raise DeviceUnavailable(
            f"--dtype bfloat16: GPU {device.index} ({torch.cuda.get_device_name(device)}) has no bfloat16; "
            "use --dtype float16"
        )
    return DTYPES[name]


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`--kv-cache-dtype` for a model in `dtype` on `device`: `auto` is `dtype`; on a CPU float32 or bfloat16
    whatever the model's (bf16 K/V are the model's rounded to bf16: half fp32's bytes, so twice the tokens in
    the same memory and half the bytes a decode's attention reads); on a GPU only the model's own (its
    attention kernels read the model's dtype)."""
    if name == "auto":
        return dtype
    if name not in KV_CACHE_DTYPES:
        raise DeviceUnavailable(f"--kv-cache-dtype {name}: not one of auto, {', '.join(KV_CACHE_DTYPES)}")
    chosen = DTYPES[name]
    if device.type == "cuda" and chosen is not dtype:
        raise DeviceUnavailable(
            f"--kv-cache-dtype {name}: on a GPU the KV cache holds the model's dtype "
            f"({str(dtype).removeprefix('torch.')}); pass auto"
        )
    return chosen


def make_current(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (Triton launches, CUDA graph capture
    and bare `torch.cuda` calls use it); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
