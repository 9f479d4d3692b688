"""The launcher's host check in flight and, on a host that is surely CPU-only, the shards started beside
it (`mixserve shard --standby`, shards/standby.py). Never imports torch.

A CPU shard spends ~3 s importing torch and its modules before it reads a flag. On a surely CPU-only host
(--device cpu, or auto with no GPU device node) the launcher starts each group it runs at once, with the
shard count it expects (`guessed_num_shard`) and the demo checkpoint left to the shards, and shard 0
answers the host check (shards/preflight.py) in its own process; they start once the plan is the one
guessed (`take`), and are killed at once otherwise, so that none takes a core from the shards that
replace them. Elsewhere the check is a process of its own (`python -m mixserve.shards.preflight`) that
ends after answering: a CUDA shard must see its group's GPUs (CUDA_VISIBLE_DEVICES) before anything in
it touches CUDA, and the check asks torch about the GPUs.
"""

import argparse
import asyncio
import copy
import json
import os
import signal
import sys
from pathlib import Path

from mixserve.router.host_check import HostCheckFailed, HostPlan, host_check_flags, read_answer
from mixserve.router.shard_spawn import ShardProcess, group_socket_dir, signal_child, start_shards, stop_shards
from mixserve.shards.cores import usable_cores

HOST_CHECK_TIMEOUT_S = 300.0
# Device nodes of GPUs torch may find (NVIDIA, AMD's ROCm, WSL's GPU): with none, `--device auto` is the CPU.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
# A wrong guess costs its processes' imports, killed at the plan: past this many cores, no guess.
MAX_GUESSED_SHARDS = 8


def surely_cpu(device: str) -> bool:
    """Whether shards of `--device` run on the CPU whatever torch finds: `cpu`, or `auto` on a host with no
    GPU device node."""
    return device == "cpu" or (device == "auto" and not any(os.path.exists(n) for n in GPU_DEVICE_NODES))


def guessed_num_shard(args: argparse.Namespace) -> int | None:
    """The shards per group to start before the check answers: --num-shard, else a core each rounded down
    to a power of two (what the heads and experts of most models divide; the check's default is the most
    the model divides), up to MAX_GUESSED_SHARDS; None where the host may have GPUs or the guess is past it."""
    if not surely_cpu(args.device):
        return None
    if args.num_shard:
        return args.num_shard
    room = max(1, usable_cores() // args.replicas)
    guess = 1 << (room.bit_length() - 1)
    return guess if guess <= MAX_GUESSED_SHARDS else None


async def _check_alone(flags: list[str]) -> asyncio.subprocess.Process:
    """The host check as a process of its own, which ends after answering."""
    return await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "mixserve.shards.preflight", *flags],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


class HostCheck:
    """The host check of one launch, and the groups started beside it (by group id)."""

    def __init__(
        self,
        flags: list[str],
        process: asyncio.subprocess.Process,
        early: dict[int, list[ShardProcess]],
        socket_root: Path,
        guess: int | None,
    ) -> None:
        self.flags = flags
        self.process = process  # shard 0 of the first early group, or the check alone
        self.early = early
        self.socket_root = socket_root
        self.guess = guess

    @classmethod
    async def start(cls, args: argparse.Namespace, socket_root: Path, group_ids: list[int]) -> "HostCheck":
        """Start the check of `args` (and the groups `group_ids` beside it where the host is surely CPU-only);
        HostCheckFailed at once where --model is no checkpoint directory."""
        flags = host_check_flags(args)
        guess = guessed_num_shard(args)
        if guess is None:
            return cls(flags, await _check_alone(flags), {}, socket_root, None)
        guessed = copy.copy(args)
        guessed.num_shard = guess
        early = {}
        for group_id in group_ids:
            socket_dir = group_socket_dir(socket_root, group_id, 1)
            socket_dir.mkdir(mode=0o700)
            early[group_id] = await start_shards(guessed, args.model, socket_dir, group_id, standby=True)
        process = early[group_ids[0]][0].process
        assert process.stdin is not None
        process.stdin.write(json.dumps({"host_check": flags}).encode() + b"\n")
        await process.stdin.drain()
        return cls(flags, process, early, socket_root, guess)

    async def plan(self) -> HostPlan:
        """The plan, or HostCheckFailed with the reason; the groups started beside it are stopped where it
        is not the plan they were started for."""
        line, last = await self._answer()
        if line is None and self.early:
            # Shard 0 ended without answering (the shard's own parser refused a flag the launcher took, say):
            # the check alone says why.
            await self.dismiss()
            self.process, self.guess = await _check_alone(self.flags), None
            line, last = await self._answer()
        if line is None:
            raise HostCheckFailed(f"cannot start shards on this host: the host check failed: {last}")
        found = read_answer(line)
        if self.guess is None:
            await self.process.communicate()  # it ends after answering
        elif found.device_type != "cpu" or found.num_shard != self.guess:
            await self.dismiss()
        return found

    async def _answer(self) -> tuple[str | None, str]:
        """The check's answer line, or None where its process ended first; and the last other line it wrote."""
        assert self.process.stdout is not None
        last = "(no output)"
        try:
            async with asyncio.timeout(HOST_CHECK_TIMEOUT_S):
                while raw := await self.process.stdout.readline():
                    line = raw.decode(errors="replace").strip()
                    if line.startswith('{"ok": '):
                        return line, last
                    last = line or last
        except TimeoutError:
            raise HostCheckFailed(f"the host check took over {HOST_CHECK_TIMEOUT_S:.0f}s") from None
        return None, last

    def take(self, group_id: int) -> list[ShardProcess]:
        """Group `group_id`'s shards started beside the check (none where there are none, or no longer)."""
        return self.early.pop(group_id, [])

    async def dismiss(self) -> None:
        """Stop the shards started beside the check that no group took, or the check's own process."""
        if self.guess is None and self.process.returncode is None:
            signal_child(self.process, signal.SIGKILL)
            await self.process.communicate()
        await stop_shards([shard for shards in self.early.values() for shard in shards], kill=True)
        for group_id in self.early:
            # Empty (they had no word to start): the group's first start makes it afresh.
            group_socket_dir(self.socket_root, group_id, 1).rmdir()
        self.early = {}
