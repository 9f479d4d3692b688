"""The router's side of the shard contract: one call fanned out to every shard of a group.

Every shard must see every call (they meet in the collectives), so each call goes to all of
them at once and the router waits for all; the answers are identical, rank 0's is returned.
Any shard failing or missing its deadline fails the call with ShardUnavailable (or the
shard's own INVALID_ARGUMENT / RESOURCE_EXHAUSTED as a ShardRejected). The engine's steps
(router/steps.py) become shard_pb2 messages here and nowhere else.

Shards on TCP may ask for a token (sent on every call as `authorization: Bearer TOKEN` metadata)
and/or serve TLS (verified against `ca_cert`); unix-socket shards are reached in the clear.
"""

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from mixserve.router.errors import RouterError, ShardUnavailable
from mixserve.router.steps import SampledToken, Sampling, Step, StepResult
from mixserve_pb import shard_pb2, shard_pb2_grpc

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


def parse_shard_addresses(text: str) -> list[str]:
    """`host:port,host:port,...` (or `unix:PATH` entries) in rank order -> the list; ValueError says why."""
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    if not addresses:
        raise ValueError("--shard-addresses lists no shard")
    for address in addresses:
        if address.startswith("unix:"):
            continue
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"shard address {address!r} is not host:port (or unix:PATH)")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"--shard-addresses names a shard twice: {text}")
    return addresses


class ShardGroup:
    """gRPC clients for the shards of one tensor-parallel group (unix:PATH or host:port each).

    `token`: sent to every shard as `authorization: Bearer TOKEN`. `ca_cert`: PEM roots; TCP shards
    are then reached over TLS and must present a certificate for the host named in their address.
    """

    def __init__(
        self,
        addresses: list[str],
        step_timeout_s: float = 60.0,
        token: str | None = None,
        ca_cert: bytes | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("a shard group needs at least one address")
        self.addresses = addresses
        self.step_timeout_s = step_timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channels = [_channel(a, ca_cert) for a in addresses]
        self._stubs = [shard_pb2_grpc.ShardServiceStub(c) for c in self._channels]

    async def _all(self, method: str, request, timeout: float | None):
        """Call every shard; the first failure fails the call at once (the others would wait in a
        collective for the missing rank)."""
        calls = [
            asyncio.ensure_future(getattr(stub, method)(request, timeout=timeout, metadata=self._metadata))
            for stub in self._stubs
        ]
        try:
            done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # Also when the caller is cancelled (the launcher stopping the engine mid-step).
            for call in calls:
                call.cancel()
        for rank, call in enumerate(calls):
            # A call the channel cancelled (closed under it) is a failure too, not our cancellation.
            if call in done and (call.cancelled() or call.exception() is not None):
                raise self._error(rank, method, None if call.cancelled() else call.exception())
        return [call.result() for call in calls]

    def _error(self, rank: int, method: str, error: BaseException | None) -> RouterError:
        if isinstance(error, grpc.aio.AioRpcError):
            code = error.code()
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                return ShardRejected(f"shard {rank} refused {method}: {error.details()}")
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return ShardUnavailable(
                    f"shard {rank} ({self.addresses[rank]}) refused {method}: UNAUTHENTICATED ({error.details()}); "
                    "the router's --shard-token (or MIXSERVE_SHARD_TOKEN) must be the shard's"
                )
            return ShardUnavailable(f"shard {rank} ({self.addresses[rank]}) failed {method}: {code.name}")
        return ShardUnavailable(f"shard {rank} failed {method}: {'cancelled' if error is None else repr(error)}")

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until every shard's channel connects; TimeoutError past `timeout_s`."""
        # Tasks, not gather under wait_for: cancelled (a stop during start-up, the channels closed
        # under them), a gather's future would log "exception was never retrieved".
        waits = [asyncio.ensure_future(c.channel_ready()) for c in self._channels]
        try:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
        finally:
            for wait in waits:
                wait.cancel()
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(waits)} shards did not connect within {timeout_s:.0f}s")

    async def info(self) -> shard_pb2.InfoResponse:
        return (await self._all("Info", shard_pb2.InfoRequest(), 30))[0]

    async def check_complete(self) -> None:
        """Raise ShardUnavailable unless the shards are ranks 0..N-1 of one group of N, in address order
        (a list of addresses written by hand can miss a rank, repeat one, or mix two groups)."""
        infos = await self.infos()
        ranks = [i.rank for i in infos]
        sizes = {i.world_size for i in infos}
        if sizes != {len(infos)} or ranks != list(range(len(infos))):
            found = ", ".join(
                f"{a} is rank {i.rank} of {i.world_size}" for a, i in zip(self.addresses, infos, strict=True)
            )
            raise ShardUnavailable(
                f"the {len(infos)} shard addresses must be ranks 0..{len(infos) - 1} of one group, in rank order: "
                f"{found}"
            )

    async def infos(self) -> list[shard_pb2.InfoResponse]:
        return await self._all("Info", shard_pb2.InfoRequest(), 30)

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when every shard answers Health and has a KV cache."""
        try:
            answers = await self._all("Health", shard_pb2.HealthRequest(), timeout_s)
        except RouterError:
            return False
        return all(a.ready for a in answers)

    async def silent(self, timeout_s: float = 2.0) -> list[int]:
        """Ranks that do not answer Health within `timeout_s`, each asked on its own: after a step
        deadline every rank's call times out, but a rank that still answers was only waiting in a
        collective for the silent one."""
        calls = [
            stub.Health(shard_pb2.HealthRequest(), timeout=timeout_s, metadata=self._metadata) for stub in self._stubs
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return [rank for rank, answer in enumerate(answers) if isinstance(answer, BaseException)]

    async def warmup(
        self, max_batch_tokens: int, max_batch_size: int, max_blocks: int, max_context_tokens: int = 0
    ) -> shard_pb2.WarmupResponse:
        """Size every shard's KV cache for steps up to these limits (0 context: the model's longest)."""
        request = shard_pb2.WarmupRequest(
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            max_blocks=max_blocks,
            max_context_tokens=max_context_tokens,
        )
        answers = await self._all("Warmup", request, None)
        if len({a.num_blocks for a in answers}) != 1:
            raise ShardUnavailable(f"shards disagree on the KV cache size: {[a.num_blocks for a in answers]}")
        return answers[0]

    async def step(self, step: Step) -> StepResult:
        """Run one step on every shard; rank 0's sampled tokens."""
        return step_result((await self._all("Step", step_request(step), self.step_timeout_s))[0])

    async def decode_steps(self, step: Step) -> AsyncIterator[StepResult]:
        """A DecodeSteps run (`step.num_steps` decodes) on every shard; yields rank 0's answer to each step.

        Every rank's stream is read to its end (ranks past 0 answer once, after the run's last step),
        each step must come within the step timeout, and any rank failing fails the run.
        """
        events: asyncio.Queue[tuple[int, shard_pb2.StepResponse | BaseException | None]] = asyncio.Queue()

        async def read(rank: int, stub: shard_pb2_grpc.ShardServiceStub) -> None:
            try:
                async for response in stub.DecodeSteps(request, metadata=self._metadata):
                    events.put_nowait((rank, response))
                events.put_nowait((rank, None))
            except Exception as e:  # handed to the loop below, which raises it as a RouterError
                events.put_nowait((rank, e))

        request = step_request(step)
        readers = [asyncio.ensure_future(read(rank, stub)) for rank, stub in enumerate(self._stubs)]
        ended = 0
        try:
            while ended < len(readers):
                try:
                    # Not wait_for: on Python 3.11 it can swallow a cancellation that lands as the
                    # get completes, and the engine task would then never stop.
                    async with asyncio.timeout(self.step_timeout_s):
                        rank, event = await events.get()
                except TimeoutError:
                    raise ShardUnavailable(
                        f"shards failed DecodeSteps: DEADLINE_EXCEEDED (a step took longer than the step timeout, "
                        f"{self.step_timeout_s:g} s)"
                    ) from None
                if isinstance(event, BaseException):
                    raise self._error(rank, "DecodeSteps", event)
                if event is None:
                    ended += 1
                elif rank == 0:
                    yield step_result(event)
                    for following in event.following:
                        yield step_result(following)
        finally:
            for reader in readers:
                reader.cancel()

    async def interrupt(self, run_id: int) -> None:
        """End DecodeSteps run `run_id` after the step in progress."""
        await self._all("Interrupt", shard_pb2.InterruptRequest(run_id=run_id), 30)

    async def clear(self) -> None:
        await self._all("Clear", shard_pb2.ClearRequest(), 30)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels), return_exceptions=True)


def step_request(step: Step) -> shard_pb2.StepRequest:
    """The wire form of an engine step."""
    sequences = []
    for seq in step.sequences:
        message = shard_pb2.SequenceStep(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids,
            start_position=seq.start_position,
            slot_mapping=seq.slot_mapping,
            block_table=seq.block_table,
            sample=seq.sample,
            prefix_token_ids=seq.prefix_token_ids,
            prompt_logprobs=seq.prompt_logprobs,
            num_proposed=seq.num_proposed,
            draft=seq.draft,
            speculate=seq.speculate,
            run_tokens=seq.run_tokens,
        )
        if seq.sampling is not None:
            message.sampling.CopyFrom(sampling_params(seq.sampling))
        sequences.append(message)
    return shard_pb2.StepRequest(
        sequences=sequences,
        release_seq_ids=step.release_seq_ids,
        num_steps=step.num_steps,
        run_id=step.run_id,
        stream_interval_us=step.stream_interval_us,
    )


def sampling_params(sampling: Sampling) -> shard_pb2.SamplingParams:
    """The wire form of a sequence's sampling settings."""
    return shard_pb2.SamplingParams(
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        seed=sampling.seed,
        top_n_tokens=sampling.top_n_tokens,
        grammar=sampling.grammar,
        typical_p=sampling.typical_p,
        logit_bias=sampling.logit_bias,
        min_p=sampling.min_p,
        allowed_token_ids=sampling.allowed_token_ids,
        bad_words=[shard_pb2.TokenIds(ids=word) for word in sampling.bad_words],
        prediction_token_ids=sampling.prediction_token_ids,
    )


def step_result(response: shard_pb2.StepResponse) -> StepResult:
    """An engine step result from its wire form."""
    tokens = [
        SampledToken(
            r.seq_id,
            r.token_id,
            r.logprob,
            [(t.token_id, t.logprob) for t in r.top_tokens],
            sampled=r.sampled,
            prompt_logprobs=list(r.prompt_logprobs),
            prompt_top_tokens=[[(t.token_id, t.logprob) for t in top.top_tokens] for top in r.prompt_top_tokens],
            prompt_ranks=list(r.prompt_ranks),
            next_tokens=[
                SampledToken(r.seq_id, n.token_id, n.logprob, [(t.token_id, t.logprob) for t in n.top_tokens])
                for n in r.next_tokens
            ],
            num_drafted=r.num_drafted,
        )
        for r in response.results
    ]
    return StepResult(tokens, response.forward_us)


def _channel(address: str, ca_cert: bytes | None) -> grpc.aio.Channel:
    if ca_cert is None or address.startswith("unix:"):
        return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_cert)
    return grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
