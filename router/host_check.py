"""Before the launcher starts a shard: the checkpoint named, the flags checked against the host, and
each shard group's GPUs. Never imports torch: the host is probed by `python -m shards.preflight`
in a child process, which runs the shards' own checks.
"""

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# A Hugging Face hub repository id: owner/name.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PREFLIGHT_TIMEOUT_S = 300.0


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


def start_preflight(args: argparse.Namespace) -> subprocess.Popen:
    """Start checking --device/--dtype/--quantize/--num-shard/--replicas/--moe-parallel against this host
    in a child process (it writes the demo checkpoint when no --model is given), and return at once:
    the launcher imports its serving half while the child imports torch. `preflight_plan` reads the
    answer. HostCheckFailed at once where --model is no checkpoint directory."""
    if args.model is not None:
        check_model_dir(args.model)
    cmd = [sys.executable, "-m", "mixserve.shards.preflight", "--device", args.device, "--dtype", args.dtype]
    cmd += ["--replicas", str(args.replicas), "--moe-parallel", args.moe_parallel]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.num_shard is not None:
        cmd += ["--num-shard", str(args.num_shard)]
    if args.model is not None:
        cmd += ["--model", args.model]
    if args.speculative_model:
        cmd += ["--speculative-model", args.speculative_model]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def preflight_plan(check: subprocess.Popen) -> HostPlan:
    """The plan of a host check `start_preflight` started, once it has answered, or HostCheckFailed with
    the reason."""
    try:
        stdout, stderr = check.communicate(timeout=PREFLIGHT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        check.kill()
        check.communicate()
        raise HostCheckFailed(
            f"the host check (python -m shards.preflight) took over {PREFLIGHT_TIMEOUT_S:.0f}s"
        ) from None
    except BaseException:  # interrupted (SIGINT): the check is no longer wanted
        check.kill()
        raise
    lines = stdout.strip().splitlines()
    if check.returncode != 0 or not lines:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HostCheckFailed(f"cannot start shards on this host: the host check failed: {last}")
    answer = json.loads(lines[-1])
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
