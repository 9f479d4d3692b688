"""The launcher's host check: whether `--device`, `--dtype`, `--kv-cache-dtype`, `--quantize` and `--num-shard` can
work here, and the number of shards when none is given, decided once before any shard starts.

The router never imports torch, so the launcher runs this in a short child process
(`python -m mixserve.shards.preflight ...`) or, on a host that is surely CPU-only, in shard 0 started
before it (shards/standby.py); either prints one JSON line: {"ok": true, ...the facts} or {"ok": false,
"error": "..."}. The checks are the shard's own (shards/devices.py,
ParallelConfig.check, shards/quant/probe.py), so the launcher refuses exactly what every shard
would, in one line instead of one traceback per shard.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.cores import usable_cores
from mixserve.shards.devices import DeviceUnavailable, resolve_device, resolve_dtype, resolve_kv_cache_dtype


class PreflightFailed(ValueError):
    """A flag combination that cannot work on this host."""


@dataclass(slots=True)
class HostPlan:
    """What the launcher starts: the checkpoint, the shards per group and where they run."""

    model_dir: str
    demo: bool
    num_shard: int
    device_type: str  # "cpu" or "cuda"
    device_count: int  # GPUs this process sees (0 on CPU)
    dtype: str
    cpu_count: int


def default_num_shard(room: int, config: ModelConfig, moe_parallel: str) -> int:
    """The most shards, at most `room`, that the model splits over evenly (its KV heads, attention
    heads and experts divide): a GPU each on a CUDA host, a core each on CPU."""
    for n in range(max(room, 1), 0, -1):
        try:
            ParallelConfig(0, n, moe_parallel).check(config)
        except ValueError:
            continue
        return n
    return 1


def plan(
    device: str,
    dtype: str,
    quantize: str | None,
    num_shard: int | None,
    replicas: int,
    moe_parallel: str,
    model_dir: str | None,
    draft_dir: str | None = None,
    kv_cache_dtype: str = "auto",
) -> HostPlan:
    """Check the flags against this host; the plan to start, or PreflightFailed saying why not."""
    demo = model_dir is None
    if demo:
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    try:
        config = ModelConfig.from_pretrained(model_dir)
        where = resolve_device(device, 0)
        torch_dtype = resolve_dtype(dtype, where)
        resolve_kv_cache_dtype(kv_cache_dtype, torch_dtype, where)
    except (DeviceUnavailable, ValueError) as e:
        raise PreflightFailed(str(e)) from None
    if draft_dir:
        from mixserve.shards.draft import check_draft

        try:
            check_draft(draft_dir, config)
        except ValueError as e:
            raise PreflightFailed(str(e)) from None
    cuda = where.type == "cuda"
    count = torch.cuda.device_count() if cuda else 0
    if device.startswith("cuda:"):
        num_shard = 1 if num_shard is None else num_shard
        if num_shard != 1 or replicas != 1:
            raise PreflightFailed(
                f"--device {device} names one GPU, for one shard (--num-shard 1, --replicas 1); for more, use "
                "--device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
    if num_shard is None:
        room = (count if cuda else usable_cores()) // replicas
        num_shard = default_num_shard(room, config, moe_parallel)
    try:
        ParallelConfig(0, num_shard, moe_parallel).check(config)
    except ValueError as e:
        raise PreflightFailed(f"--num-shard {num_shard}: {e}") from None
    if cuda and not device.startswith("cuda:") and count < replicas * num_shard:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{count} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
        raise PreflightFailed(
            f"--replicas {replicas} x --num-shard {num_shard} needs {replicas * num_shard} GPUs, one per shard; "
            f"this host has {seen}"
        )
    if quantize:
        from mixserve.shards.quant.config import QuantizationConfig
        from mixserve.shards.quant.probe import QuantizationUnavailable, check_supported

        try:
            check_supported(QuantizationConfig(quantize), torch_dtype, where)
        except QuantizationUnavailable as e:
            raise PreflightFailed(str(e)) from None
    return HostPlan(
        model_dir=model_dir,
        demo=demo,
        num_shard=num_shard,
        device_type=where.type,
        device_count=count,
        dtype=str(torch_dtype).removeprefix("torch."),
        cpu_count=usable_cores(),
    )


def answer(argv: list[str]) -> dict:
    """The host check of these flags as the launcher reads it: {"ok": True, ...the plan's fields} or
    {"ok": False, "error": "..."}."""
    parser = argparse.ArgumentParser(prog="python -m mixserve.shards.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantize")
    parser.add_argument("--num-shard", type=int)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--moe-parallel", default="tp")
    parser.add_argument("--model")
    parser.add_argument("--speculative-model")
    args = parser.parse_args(argv)
    try:
        found = plan(
            args.device,
            args.dtype,
            args.quantize,
            args.num_shard,
            args.replicas,
            args.moe_parallel,
            args.model,
            args.speculative_model,
            args.kv_cache_dtype,
        )
    except PreflightFailed as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, **asdict(found)}


def main(argv: list[str] | None = None) -> int:
    """Print the plan, or the reason there is none, as one JSON line."""
    sys.stdout.write(json.dumps(answer(sys.argv[1:] if argv is None else argv)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
