"""One shard group: started (router/shard_spawn.py), waited for, warmed up, watched, stopped.

`ShardSupervisor` is one group of the launcher, started at start-up and again on every restart
(router/recovery.py decides when); with `addresses` it is a group started elsewhere (torchrun,
`mixserve shard`, Kubernetes) that it only connects to. Never imports torch.
"""

import argparse
import asyncio
import logging
import math
import os
import time
from pathlib import Path

from mixserve.router.shard_client import ShardGroup, parse_shard_addresses
from mixserve.router.shard_spawn import (
    ShardProcess,
    go_shards,
    group_socket_dir,
    start_shards,
    stop_shards,
)
from mixserve.router.stopping import unless_stopped
from mixserve_pb import shard_pb2

log = logging.getLogger("mixserve.launcher")

# A group started elsewhere is polled: every REMOTE_HEALTH_POLL_S seconds, counted failed after
# REMOTE_HEALTH_FAILURES Health calls in a row fail or say not ready.
REMOTE_HEALTH_POLL_S = 2.0
REMOTE_HEALTH_TIMEOUT_S = 10.0
REMOTE_HEALTH_FAILURES = 3


async def wait_until_ready(group: ShardGroup, shards: list[ShardProcess], timeout_s: float) -> None:
    """Wait for every shard's socket to answer; fail naming the shard that exited or never answered."""
    ready = asyncio.create_task(group.wait_ready(timeout_s))
    exits = [asyncio.create_task(s.process.wait()) for s in shards]
    try:
        done, _ = await asyncio.wait([ready, *exits], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # a stop during start-up
        for task in [ready, *exits]:
            task.cancel()
        raise
    for shard, task in zip(shards, exits, strict=True):
        if task in done:
            ready.cancel()
            raise RuntimeError(shard.describe_exit())
    for task in exits:
        task.cancel()
    try:
        ready.result()
    except TimeoutError:
        if not shards:
            raise RuntimeError(
                f"the shards at {','.join(group.addresses)} did not all accept a connection within {timeout_s:.0f}s "
                "(not started, a wrong address, or TLS refused: a certificate --shard-ca does not verify)"
            ) from None
        silent = [s for s in shards if not os.path.exists(s.address.removeprefix("unix:"))]
        which = silent[0] if silent else shards[0]
        tail = "\n".join(which.last_lines)
        raise RuntimeError(
            f"shard {which.rank} did not answer within {timeout_s:.0f}s; its last lines:\n{tail}"
        ) from None


# Prompt tokens per step when --max-batch-prefill-tokens is not given, by the shards' device type.
# On a CPU a step of ~256 prompt tokens already keeps the core busy (per token within ~10 % of a
# 1024-token step), so bigger chunks only hold back other prompts' first tokens and the running
# decodes' next ones (eight 64-token prompts arriving together: TTFT p50 ~48 -> ~35 ms at 2 shards);
# a GPU needs thousands of tokens in a step to fill.
DEFAULT_PREFILL_TOKENS = {"cpu": 256}
DEFAULT_PREFILL_TOKENS_ELSEWHERE = 4096


def prefill_tokens_per_step(flag: int | None, device: str) -> int:
    """--max-batch-prefill-tokens where given, else the default for `device` ("cpu", "cuda:0", ...)."""
    if flag is not None:
        return flag
    return DEFAULT_PREFILL_TOKENS.get(device.split(":")[0], DEFAULT_PREFILL_TOKENS_ELSEWHERE)


class ShardSupervisor:
    """One shard group of the launcher: started at start-up and again on every restart, watched, stopped.

    `addresses`: the group's `host:port,...` when it runs elsewhere (--shard-addresses, --shard-group);
    None to start its shards here. `visible_devices`: the GPUs its shards get (CUDA_VISIBLE_DEVICES),
    None to leave that as the launcher has it."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_dir: str,
        socket_root: Path,
        group_id: int = 0,
        addresses: str | None = None,
        visible_devices: str | None = None,
        early: list[ShardProcess] | None = None,
    ) -> None:
        self.args = args
        # The first start's shards, started beside the host check (router/shard_standby.py), or none.
        self.early = early or []
        self.visible_devices = visible_devices
        self.model_dir = model_dir
        self.socket_root = socket_root
        self.group_id = group_id
        self.addresses = addresses
        self.shards: list[ShardProcess] = []
        self.group: ShardGroup | None = None
        self.starts = 0
        self.startup_s = 0.0
        # Why a group started elsewhere counts as failed (it stopped answering Health), or None.
        self.lost: str | None = None

    @property
    def retry_after_s(self) -> int:
        """Seconds a restart should take (what clients are told to wait): as long as the last start."""
        return max(1, math.ceil(self.startup_s))

    async def start(self, stop: asyncio.Event) -> tuple[shard_pb2.InfoResponse, shard_pb2.WarmupResponse] | None:
        """Start a new group, wait until every shard answers, and warm it up; None when `stop` is set
        first. Fresh sockets and a fresh rendezvous port, so the torch process group forms anew."""
        self.starts += 1
        self.lost = None
        started = time.monotonic()
        if self.addresses:
            # A group started elsewhere: nothing to start; a restart reconnects and warms it up again.
            self.group = remote_shard_group(self.args, self.addresses)
        else:
            if self.early:
                # Started beside the host check: the start took as long as since then (its Retry-After).
                started = min(shard.started for shard in self.early)
                self.shards, self.early = self.early, []
                await go_shards(self.shards, self.group_id)
            else:
                socket_dir = group_socket_dir(self.socket_root, self.group_id, self.starts)
                socket_dir.mkdir(mode=0o700)
                # Not cancellable: every process started must be in self.shards for stop() to find it.
                self.shards = await start_shards(
                    self.args, self.model_dir, socket_dir, self.group_id, self.visible_devices
                )
            # The token too: shards inherit MIXSERVE_SHARD_TOKEN and then ask for it even on unix sockets.
            addresses = [s.address for s in self.shards]
            self.group = ShardGroup(addresses, step_timeout_s=self.args.step_timeout, token=self.args.shard_token)
        ready = await unless_stopped(self._warm_up(self.group), stop)
        self.startup_s = time.monotonic() - started
        return ready

    async def _warm_up(self, group: ShardGroup) -> tuple[shard_pb2.InfoResponse, shard_pb2.WarmupResponse]:
        # Warmup has no deadline (--step-timeout is for steps); the first real steps run shapes it ran.
        await wait_until_ready(group, self.shards, self.args.shard_timeout)
        await group.check_complete()
        info = await group.info()
        args = self.args
        prefill_tokens = prefill_tokens_per_step(args.max_batch_prefill_tokens, info.device)
        warm = await group.warmup(
            prefill_tokens + args.max_batch_size, args.max_batch_size, args.max_kv_blocks, args.max_total_tokens or 0
        )
        return info, warm

    def exited(self) -> ShardProcess | None:
        """The first shard of the group that has exited, if any."""
        return next((s for s in self.shards if s.process.returncode is not None), None)

    async def wait_exit(self) -> None:
        """Wait until any shard of the current group exits; for a group started elsewhere, until it
        fails Health REMOTE_HEALTH_FAILURES times in a row (see `lost`)."""
        if not self.shards:
            await self._wait_remote_lost()
            return
        exits = [asyncio.ensure_future(s.process.wait()) for s in self.shards]
        try:
            await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in exits:
                task.cancel()

    async def _wait_remote_lost(self) -> None:
        # No processes of ours to watch: a group restarted by its own supervisor (torchrun,
        # Kubernetes) answers Health again but has no KV cache, so it says not ready; the router
        # would otherwise notice only when a request fails. Several misses in a row, so that one
        # slow answer under load does not restart a healthy group.
        misses = 0
        while misses < REMOTE_HEALTH_FAILURES:
            await asyncio.sleep(REMOTE_HEALTH_POLL_S)
            healthy = self.group is not None and await self.group.health(REMOTE_HEALTH_TIMEOUT_S)
            misses = 0 if healthy else misses + 1
        where = ",".join(self.group.addresses) if self.group is not None else self.addresses
        self.lost = f"the shard group at {where} failed Health {REMOTE_HEALTH_FAILURES} times in a row"

    async def stop(self, kill: bool = False) -> None:
        """Close the group's channels and stop its processes (SIGKILL with `kill`: a restart keeps nothing)."""
        if self.group is not None:
            await self.group.close()
            self.group = None
        await stop_shards(self.early, kill=True)  # stopped before it started
        self.early = []
        await stop_shards(self.shards, kill=kill)


def remote_shard_group(args: argparse.Namespace, addresses_text: str) -> ShardGroup:
    """--shard-addresses or one --shard-group: clients for a group started elsewhere (torchrun,
    `mixserve shard`, Kubernetes)."""
    try:
        ca_cert = args.shard_ca.read_bytes() if args.shard_ca else None
    except OSError as e:
        raise ValueError(f"--shard-ca: {e}") from None
    addresses = parse_shard_addresses(addresses_text)
    return ShardGroup(addresses, step_timeout_s=args.step_timeout, token=args.shard_token, ca_cert=ca_cert)
