"""The router's side of the shard contract: one call fanned out to every shard of a group.

Every shard must see every call (they meet in the collectives), so each call goes to all of
them at once and the router waits for all; the answers are identical, rank 0's is returned.
Any shard failing or missing its deadline fails the call with ShardUnavailable (or the
shard's own INVALID_ARGUMENT / RESOURCE_EXHAUSTED as a ShardRejected).
"""

import asyncio
import logging

import grpc
import grpc.aio

from mixserve_pb import shard_pb2, shard_pb2_grpc
from router.errors import RouterError, ShardUnavailable

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # Shards take seconds to minutes to load; without a cap gRPC's reconnect backoff grows to 120 s
    # and a shard that came up is noticed long after it could serve.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ShardRejected(RouterError):
    """A shard refused a call as malformed; a router bug, never the client's fault."""

    status = 500
    error_type = "generation"


class ShardGroup:
    """gRPC clients for the shards of one tensor-parallel group (unix:PATH or host:port each)."""

    def __init__(self, addresses: list[str], step_timeout_s: float = 60.0) -> None:
        if not addresses:
            raise ValueError("a shard group needs at least one address")
        self.addresses = addresses
        self.step_timeout_s = step_timeout_s
        self._channels = [grpc.aio.insecure_channel(a, options=_CHANNEL_OPTIONS) for a in addresses]
        self._stubs = [shard_pb2_grpc.ShardServiceStub(c) for c in self._channels]

    async def _all(self, method: str, request, timeout: float | None):
        """Call every shard; the first failure fails the call at once (the others would wait in a
        collective for the missing rank)."""
        calls = [asyncio.ensure_future(getattr(stub, method)(request, timeout=timeout)) for stub in self._stubs]
        done, pending = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
        for rank, call in enumerate(calls):
            if call in done and call.exception() is not None:
                for other in pending:
                    other.cancel()
                raise self._error(rank, method, call.exception())
        return [call.result() for call in calls]

    def _error(self, rank: int, method: str, error: BaseException) -> RouterError:
        if isinstance(error, grpc.aio.AioRpcError):
            code = error.code()
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                return ShardRejected(f"shard {rank} refused {method}: {error.details()}")
            return ShardUnavailable(f"shard {rank} ({self.addresses[rank]}) failed {method}: {code.name}")
        return ShardUnavailable(f"shard {rank} failed {method}: {error!r}")

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until every shard's channel connects."""
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self._channels)), timeout_s)

    async def info(self) -> shard_pb2.InfoResponse:
        return (await self._all("Info", shard_pb2.InfoRequest(), 30))[0]

    async def infos(self) -> list[shard_pb2.InfoResponse]:
        return await self._all("Info", shard_pb2.InfoRequest(), 30)

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when every shard answers Health and has a KV cache."""
        try:
            answers = await self._all("Health", shard_pb2.HealthRequest(), timeout_s)
        except RouterError:
            return False
        return all(a.ready for a in answers)

    async def warmup(self, max_batch_tokens: int, max_batch_size: int, max_blocks: int) -> shard_pb2.WarmupResponse:
        request = shard_pb2.WarmupRequest(
            max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, max_blocks=max_blocks
        )
        answers = await self._all("Warmup", request, None)
        if len({a.num_blocks for a in answers}) != 1:
            raise ShardUnavailable(f"shards disagree on the KV cache size: {[a.num_blocks for a in answers]}")
        return answers[0]

    async def step(self, request: shard_pb2.StepRequest) -> shard_pb2.StepResponse:
        return (await self._all("Step", request, self.step_timeout_s))[0]

    async def release(self, seq_ids: list[int]) -> None:
        await self._all("Release", shard_pb2.ReleaseRequest(seq_ids=seq_ids), 30)

    async def clear(self) -> None:
        await self._all("Clear", shard_pb2.ClearRequest(), 30)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels), return_exceptions=True)
