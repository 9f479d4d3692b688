"""Before the launcher starts a shard: the checkpoint named, the flags checked against the host, and
each shard group's GPUs. Never imports torch: the host is probed in another process by the shards' own
checks (shards/preflight.py; router/shard_standby.py starts it).
"""

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

# A Hugging Face hub repository id: owner/name.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HostCheckFailed(Exception):
    """The launch cannot work here; the message is the one line to show."""


@dataclass(slots=True, frozen=True)
class HostPlan:
    """mixserve.shards.preflight's answer (its HostPlan's fields, read from JSON): what to start and where."""

    model_dir: str
    demo: bool
    num_shard: int
    device_type: str
    device_count: int
    dtype: str
    cpu_count: int


def check_model_dir(model: str) -> None:
    """Raise HostCheckFailed unless `model` is a checkpoint directory; a hub id gets the command
    that downloads it."""
    path = Path(model)
    if (path / "config.json").is_file():
        return
    if path.is_dir():
        raise HostCheckFailed(f"--model {model}: no config.json there (not a Hugging Face checkpoint directory)")
    if HUB_ID.fullmatch(model) and not model.startswith("."):
        local = model.split("/")[1]
        raise HostCheckFailed(
            f"--model {model}: no such directory; to serve the hub model, download it first with "
            f"`hf download {model} --local-dir {local}` (huggingface_hub's CLI; older releases name it "
            f"huggingface-cli), then pass --model {local}"
        )
    raise HostCheckFailed(f"--model {model}: no such directory")


def host_check_flags(args: argparse.Namespace) -> list[str]:
    """The host check's flags (shards/preflight.py's): --device/--dtype/--kv-cache-dtype/--quantize/--num-shard/
    --replicas/--moe-parallel and the checkpoints (it writes the demo checkpoint when no --model is given).
    HostCheckFailed at once where --model is no checkpoint directory."""
    if args.model is not None:
        check_model_dir(args.model)
    flags = ["--device", args.device, "--dtype", args.dtype, "--kv-cache-dtype", args.kv_cache_dtype]
    flags += ["--replicas", str(args.replicas), "--moe-parallel", args.moe_parallel]
    if args.quantize:
        flags += ["--quantize", args.quantize]
    if args.num_shard is not None:
        flags += ["--num-shard", str(args.num_shard)]
    if args.model is not None:
        flags += ["--model", args.model]
    if args.speculative_model:
        flags += ["--speculative-model", args.speculative_model]
    return flags


def read_answer(line: str) -> HostPlan:
    """The plan in the host check's answer (one JSON line), or HostCheckFailed with its reason."""
    answer = json.loads(line)
    if not answer.pop("ok"):
        raise HostCheckFailed(answer["error"])
    return HostPlan(**answer)


def group_visible_devices(visible: str | None, device_count: int, num_shard: int, group: int) -> str:
    """CUDA_VISIBLE_DEVICES for shard group `group`: GPUs group * num_shard ... + num_shard - 1 of
    those this host shows (`visible`, the launcher's own CUDA_VISIBLE_DEVICES, else 0..count-1)."""
    shown = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(device_count)]
    mine = shown[:device_count][group * num_shard : (group + 1) * num_shard]
    if len(mine) != num_shard:
        raise HostCheckFailed(f"shard group {group} needs GPUs {group * num_shard}..{(group + 1) * num_shard - 1}")
    return ",".join(mine)
