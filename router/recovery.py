"""Shard failure recovery: watch the shard group, and restart it whole when it fails.

A shard that exits, or a step that misses its deadline (--step-timeout: a shard hung, or stopped),
fails the group: every request in flight or queued ends at once with an error (503 with
Retry-After before its first token), new ones are refused the same way, /health answers 503 with
the reason. The launcher then stops every shard, starts a new group (fresh rendezvous, so the torch
process group forms anew), waits for Health, warms it up, and hands the engine a fresh scheduler:
all KV is gone with the old group. After --max-restarts restarts, the next failure is final.

Several shard groups behind one router (router/replicas.py) are each supervised so, on their own: a
group that fails for good is taken out and its shards stopped while the others keep serving.
"""

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from mixserve.router.engine import Engine
from mixserve.router.errors import RouterError
from mixserve.router.grpc_server import GrpcFront
from mixserve.router.replicas import Replicas

if TYPE_CHECKING:
    from mixserve.router.shard_processes import ShardSupervisor

log = logging.getLogger("mixserve.launcher")

# What fails a start of the shard group (at start-up, or a restart).
START_ERRORS = (RuntimeError, RouterError, ValueError)


async def supervise(
    engine: Engine, shards: "ShardSupervisor", grpc_front: GrpcFront | None, stop: asyncio.Event, max_restarts: int
) -> bool:
    """Serve until asked to stop (True), restarting the shard group each time it fails, up to
    `max_restarts` times; False when it fails once more (a restart that cannot start counts too)."""
    restarts = 0
    reason = await next_failure(engine, shards, stop)
    while reason is not None:
        if restarts >= max_restarts:
            engine.retry_after_s = None
        # Ends every request in flight or queued (unless the engine failed them first), refuses new ones.
        engine.fail(reason)
        if grpc_front is not None:
            await grpc_front.health.follow_engine()
        if restarts >= max_restarts:
            log.error(
                "event=shard_group_failed restarts=%d max_restarts=%d reason=%r group=%d",
                restarts,
                max_restarts,
                reason,
                shards.group_id,
            )
            return False
        restarts += 1
        log.warning(
            "event=shard_group_restart restart=%d max_restarts=%d reason=%r group=%d",
            restarts,
            max_restarts,
            reason,
            shards.group_id,
        )
        engine.metrics.on_shard_restart()
        await engine.stop()
        await shards.stop(kill=True)
        try:
            ready = await shards.start(stop)
        except START_ERRORS as e:
            reason = f"the restarted shard group did not start: {e}"
            continue
        if ready is None:
            return True
        _, warm = ready
        engine.retry_after_s = shards.retry_after_s if restarts < max_restarts else None
        config = dataclasses.replace(engine.scheduler.config, num_blocks=warm.num_blocks, block_size=warm.block_size)
        engine.restart(shards.group, config)
        if grpc_front is not None:
            await grpc_front.health.follow_engine()
        log.info(
            "event=shard_group_restarted restart=%d startup_ms=%d kv_blocks=%d group=%d",
            restarts,
            shards.startup_s * 1000,
            warm.num_blocks,
            shards.group_id,
        )
        reason = await next_failure(engine, shards, stop)
    return True


async def supervise_groups(
    replicas: Replicas,
    groups: list["ShardSupervisor"],
    grpc_front: GrpcFront | None,
    stop: asyncio.Event,
    max_restarts: int,
) -> bool:
    """`supervise` every shard group at once, each with its own `max_restarts`: True when asked to stop,
    False once every group has failed for good. A group that fails for good is taken out (its shards
    stopped; the router sends it nothing more) while the others serve."""
    tasks = {
        asyncio.create_task(supervise(engine, shards, grpc_front, stop, max_restarts)): shards
        for engine, shards in zip(replicas.engines, groups, strict=True)
    }
    pending, failed = set(tasks), 0
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.result():
                    continue
                failed += 1
                shards = tasks[task]
                await shards.stop(kill=True)
                if failed < len(tasks):
                    log.error("event=shard_group_removed group=%d serving=%d", shards.group_id, len(tasks) - failed)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return failed < len(tasks)


async def next_failure(engine: Engine, shards: "ShardSupervisor", stop: asyncio.Event) -> str | None:
    """Wait until a shard exits, a step fails (its deadline included) or a stop is asked; the
    failure, naming the shard to blame where the shards tell, or None for a stop."""
    watches = [asyncio.ensure_future(w) for w in (stop.wait(), shards.wait_exit(), engine.wait_failed())]
    try:
        await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watch in watches:
            watch.cancel()
    if stop.is_set():
        return None
    silent: list[int] = []
    if engine.failure is not None and shards.group is not None:
        # After a step deadline every rank's call has timed out; the ones still answering were only
        # waiting in a collective for the silent one.
        silent = await shards.group.silent()
    dead = shards.exited()
    if dead is not None:
        log.error("event=shard_died %s", dead.describe_exit().replace("\n", " | "))
        return f"shard {dead.rank} exited with code {dead.process.returncode}"
    if silent:
        return f"shard {', '.join(map(str, silent))} stopped answering ({engine.failure})"
    return engine.failure or shards.lost
