"""The public gRPC front: `GenerationService` (proto/generate.proto), grpc.health.v1 and reflection.

It runs on grpc.aio in the router's asyncio loop, beside aiohttp, and hands requests to the same
engine. Fields are validated by `GenerationParams` and router/params.py's validators, so a bad
value gets the HTTP API's message; a `RouterError` becomes the status code of its HTTP status,
with its `error_type` in the trailing metadata key `error-type`.
"""

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mixserve.router import request_ids
from mixserve.router.engine_api import EngineAPI, GenerationHandle, TokenEvent
from mixserve.router.errors import RouterError, Unauthorized, ValidationError
from mixserve.router.fields import as_messages, as_prompt, json_value
from mixserve.router.front_config import ServerConfig, api_key_matches
from mixserve.router.params import DEFAULT_LIMITS, GenerationParams, GenerationRequest, RequestLimits
from mixserve.router.server_tls import ServerTLS
from mixserve.router.structured import (
    GrammarSpec,
    choice_spec,
    json_schema_spec,
    lark_spec,
    regex_spec,
)
from mixserve.router.validation import prompt_ids, validate
from mixserve_pb import generate_pb2, generate_pb2_grpc

log = logging.getLogger("mixserve.router")

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name

_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_FINISH_REASONS = {
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "eos_token": generate_pb2.FINISH_REASON_EOS_TOKEN,
    "stop_sequence": generate_pb2.FINISH_REASON_STOP_SEQUENCE,
}
# GenerationParameters fields whose absence means GenerationParams' default; same names there.
_OPTIONAL_PARAMETERS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "typical_p",
)


def status_code(exc: RouterError) -> grpc.StatusCode:
    """The gRPC status for a router error, by its HTTP status; anything unforeseen is INTERNAL."""
    return _STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL)


def parse_input(
    prompt: str | None, messages: list[generate_pb2.ChatMessage]
) -> tuple[str | None, list[dict[str, str]] | None]:
    """The prompt or chat messages of a request; an empty `messages` list counts as absent."""
    chat = [{"role": m.role, "content": m.content} for m in messages]
    return (
        None if prompt is None else as_prompt("prompt", prompt),
        as_messages("messages", chat) if chat else None,
    )


def parse_generate_request(
    request: generate_pb2.GenerateRequest, limits: RequestLimits = DEFAULT_LIMITS
) -> GenerationRequest:
    """Validate a GenerateRequest into the request /predict would build; raises BadRequest or ValidationError."""
    p = request.parameters
    given = {name: getattr(p, name) for name in _OPTIONAL_PARAMETERS if p.HasField(name)}
    grammar = _grammar(p.grammar) if p.HasField("grammar") else None
    params = GenerationParams(
        **given,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
        top_n_tokens=p.top_n_tokens,
        grammar=grammar,
        logit_bias=dict(p.logit_bias),
        allowed_token_ids=list(p.allowed_token_ids),
        bad_words=list(p.bad_words),
        prediction=p.prediction or None,
        priority=p.priority,
    )
    limits.check(params)
    prompt, messages = parse_input(request.prompt if request.HasField("prompt") else None, request.messages)
    ids = list(request.prompt_token_ids) or None
    return GenerationRequest(prompt=prompt, messages=messages, params=params, prompt_token_ids=ids)


def _grammar(grammar: generate_pb2.Grammar) -> GrammarSpec:
    """The constraint of a `Grammar` message: its value is text (a JSON schema as JSON text)."""
    field = "parameters.grammar.value"
    if grammar.type == "json_object":
        return json_schema_spec(field, {"type": "object"})
    if grammar.type == "json":
        return json_schema_spec(field, grammar.value or "{}")
    if grammar.type == "regex":
        return regex_spec(field, grammar.value)
    if grammar.type == "choice":
        return choice_spec(field, json_value(grammar.value, field, ValidationError))
    if grammar.type == "lark":
        return lark_spec(field, grammar.value)
    raise ValidationError(
        f"parameters.grammar.type must be one of json, json_object, regex, choice, lark; got {grammar.type!r}"
    )


def _token(event: TokenEvent) -> generate_pb2.Token:
    return generate_pb2.Token(
        id=event.token_id,
        text=event.text,
        logprob=event.logprob,
        special=event.special,
        top_tokens=[generate_pb2.TopToken(id=i, logprob=logprob) for i, logprob in event.top_tokens],
    )


Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _rpc(method: Handler) -> Handler:
    """Authenticate, map RouterErrors to status codes, and count the call in the metrics."""
    route = f"/{SERVICE_NAME}/{method.__name__}"

    @functools.wraps(method)
    async def handler(self: "GenerationServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        code = grpc.StatusCode.OK
        try:
            self.authenticate(context)
            metadata = dict(context.invocation_metadata() or ())
            with request_ids.taken(metadata.get(request_ids.METADATA_KEY)):
                return await method(self, request, context)
        except RouterError as exc:
            code = status_code(exc)
            log.info("event=refused rpc=%s code=%s error_type=%s", route, code.name, exc.error_type)
            await context.abort(code, str(exc), trailing_metadata=(("error-type", exc.error_type),))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("event=internal_error rpc=%s", route)
            await context.abort(code, "internal server error", trailing_metadata=(("error-type", "internal"),))
        finally:
            self.engine.metrics.requests.labels("grpc", route, code.name).inc()

    return handler


class GenerationServicer(generate_pb2_grpc.GenerationServiceServicer):
    """mixserve.generate.v1.GenerationService over the router's engine."""

    def __init__(self, engine: EngineAPI, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config

    def authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """With an API key configured, require metadata `authorization: Bearer KEY` (or `Api-Key KEY`)."""
        key = self.config.api_key
        if not key:
            return
        given = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        if not api_key_matches(given, key):
            raise Unauthorized("missing or invalid API key (send metadata authorization: Bearer KEY)")

    async def _submit(self, request: generate_pb2.GenerateRequest) -> GenerationHandle:
        parsed = parse_generate_request(request, self.config.limits)
        valid = await validate(self.engine, parsed)
        return self.engine.submit(valid.prompt_ids, valid.params)

    @_rpc
    async def Generate(self, request: generate_pb2.GenerateRequest, context) -> generate_pb2.GenerateResponse:
        generation = await self._submit(request)
        events = generation.stream()
        try:
            tokens = [_token(event) async for event in events]
        finally:
            await events.aclose()
        return generate_pb2.GenerateResponse(
            text="".join(t.text for t in tokens),
            finish_reason=_FINISH_REASONS[generation.finish_reason],
            prompt_tokens=generation.prompt_tokens,
            generated_tokens=generation.generated_tokens,
            tokens=tokens,
            request_id=generation.id,
            speculative_proposed=generation.speculative_proposed,
            speculative_accepted=generation.speculative_accepted,
        )

    @_rpc
    async def GenerateStream(self, request: generate_pb2.GenerateRequest, context) -> None:
        # context.write rather than an async generator: a client that cancels interrupts the
        # write or the wait, and the finally below ends the request at once, not at GC time.
        generation = await self._submit(request)
        events = generation.stream()
        # Counted here: the engine may already be tokens ahead of a slow reader.
        sent = 0
        try:
            async for event in events:
                sent += 1
                last = event.finish_reason is not None
                await context.write(
                    generate_pb2.GenerateStreamResponse(
                        token=_token(event),
                        finish_reason=_FINISH_REASONS.get(event.finish_reason, generate_pb2.FINISH_REASON_UNSPECIFIED),
                        prompt_tokens=generation.prompt_tokens,
                        generated_tokens=sent,
                        request_id=generation.id,
                        speculative_proposed=generation.speculative_proposed if last else 0,
                        speculative_accepted=generation.speculative_accepted if last else 0,
                    )
                )
        finally:
            await events.aclose()

    @_rpc
    async def Tokenize(self, request: generate_pb2.TokenizeRequest, context) -> generate_pb2.TokenizeResponse:
        prompt, messages = parse_input(request.prompt if request.HasField("prompt") else None, request.messages)
        ids = prompt_ids(self.engine, GenerationRequest(prompt=prompt, messages=messages, params=GenerationParams()))
        return generate_pb2.TokenizeResponse(ids=ids, pieces=self.engine.tokenizer.convert_ids_to_tokens(ids))

    @_rpc
    async def ModelInfo(self, request: generate_pb2.ModelInfoRequest, context) -> generate_pb2.ModelInfoResponse:
        engine, config = self.engine, self.config
        stats = engine.stats()
        return generate_pb2.ModelInfoResponse(
            model_id=config.model_id,
            model_dtype=config.dtype,
            kv_cache_dtype=config.kv_cache_dtype,
            num_shard=config.num_shard,
            version=config.version,
            max_concurrent_requests=stats.limits.max_concurrent_requests,
            max_input_tokens=stats.limits.max_input_tokens,
            max_total_tokens=stats.limits.max_total_tokens,
            max_batch_prefill_tokens=stats.max_batch_prefill_tokens,
            block_size=stats.block_size,
            kv_blocks_total=stats.kv_blocks_total,
            vocab_size=len(engine.tokenizer),
            eos_token_ids=stats.eos_token_ids,
            has_chat_template=engine.tokenizer.chat_template is not None,
        )


class EngineHealth(health.aio.HealthServicer):
    """grpc.health.v1 for the server ("") and GenerationService: NOT_SERVING while the shard group is
    down (failed or restarting), SERVING again once it is back; NOT_SERVING for good once stopping."""

    def __init__(self, engine: EngineAPI) -> None:
        super().__init__()
        self._engine = engine

    async def follow_engine(self) -> None:
        """Report the engine's state now (Watch streams see the change)."""
        # The engine fails from its own loop (a step that times out) without telling anyone, so
        # every probe also looks at it. After enter_graceful_shutdown, `set` changes nothing.
        status = health_pb2.HealthCheckResponse.SERVING
        if not self._engine.serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        await self.follow_engine()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        await self.follow_engine()
        await super().Watch(request, context)


class GrpcFront:
    """The grpc.aio server of one router; start and stop it on the loop that runs the engine.

    Health and reflection answer without an API key: probes carry no credentials, and the
    schema is the public proto/generate.proto.
    """

    def __init__(
        self, engine: EngineAPI, config: ServerConfig, host: str, port: int, tls: ServerTLS | None = None
    ) -> None:
        # SO_REUSEPORT off: a second server on a busy port must fail to bind, not share it.
        options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", config.max_body_bytes)]
        self.server = grpc.aio.server(options=options)
        self.health = EngineHealth(engine)
        generate_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(engine, config), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if tls is None:
            self.server.add_insecure_port(self.address)
        else:
            self.server.add_secure_port(self.address, tls.grpc_credentials())

    async def start(self) -> None:
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        log.info("event=grpc_serving address=%s service=%s", self.address, SERVICE_NAME)

    async def stop(self, grace_s: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, and let calls in flight finish up to `grace_s` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
