"""The router's HTTP app as `mixserve launch` builds it, over a real engine whose shard group is absent: for
tests of what answers without reaching the shards (/info, /tokenize, the spec, headers, refusals before a
request is admitted), in-process and without a server start."""

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from mixserve.router.generation import Limits
from mixserve.router.replicas import build_replicas
from mixserve.router.scheduler import SchedulerConfig
from mixserve.router.server import ServerConfig, build_app
from mixserve.router.shard_client import ShardGroup


@contextlib.asynccontextmanager
async def client_without_shards(tokenizer, socket_dir: Path, config: ServerConfig) -> AsyncIterator[TestClient]:
    """A test client of the app over `tokenizer`; its shard group's socket (in `socket_dir`) has no shard."""
    group = ShardGroup([f"unix:{socket_dir}/no-shard.sock"])
    engine = build_replicas([(group, SchedulerConfig(num_blocks=64, block_size=16))], tokenizer, Limits(), (2,), 1)
    try:
        async with TestClient(TestServer(build_app(engine, config))) as client:
            yield client
    finally:
        await group.close()
