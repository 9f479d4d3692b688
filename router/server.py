"""The router's HTTP front (aiohttp): `/predict`, `/health`, `/info`, errors and authentication.

Handlers validate and tokenize, hand the request to the engine, and turn its token events into
the response; they never touch the shards themselves. The OpenAI (`api_openai`) and TGI (`api_tgi`)
APIs and the spec (`openapi`) build on the helpers here and are registered by `build_app`.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from router.engine import Engine
from router.errors import BadRequest, PayloadTooLarge, ReadTimeout, RouterError, Unauthorized, error_body, error_headers
from router.generation import Generation
from router.metrics import install as install_metrics
from router.params import (
    GenerationRequest,
    RequestLimits,
    decode_json_body,
    parse_predict_request,
    render_prompt,
)
from router.replicas import Replicas
from router.structured import compile_grammar

log = logging.getLogger("mixserve.router")

# Routes that answer without an API key: probes from load balancers and orchestrators.
PUBLIC_PATHS = frozenset({"/health"})


@dataclass(slots=True)
class ServerConfig:
    """What the HTTP front needs to know besides the engine."""

    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 2 << 20
    # Seconds a client has to send its whole body (its headers are bounded by the server's keep-alive timeout).
    read_timeout_s: float = 60.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    num_shard: int = 1
    dtype: str = ""
    quantize: str = ""
    weight_bytes_per_shard: int = 0
    version: str = ""
    # --served-model-name: the names the OpenAI API answers to (the first is the default one); none: model_id.
    served_model_names: tuple[str, ...] = ()
    # --strict-model-name: a request naming another model is a 404 instead of being served by this one.
    strict_model_name: bool = False


ENGINE = web.AppKey("engine", Replicas)
CONFIG = web.AppKey("config", ServerConfig)
STARTED = web.AppKey("started", float)


def error_response(exc: RouterError) -> web.Response:
    return web.json_response(error_body(exc), status=exc.status, headers=error_headers(exc))


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every failure becomes JSON `{"error", "error_type"}` with the right status."""
    try:
        return await handler(request)
    except RouterError as exc:
        log.info("event=refused path=%s status=%d error_type=%s", request.path, exc.status, exc.error_type)
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge(f"request body exceeds {request.client_max_size} bytes"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type = "not_found" if exc.status == 404 else "bad_request" if exc.status < 500 else "internal"
        return web.json_response({"error": exc.reason, "error_type": error_type}, status=exc.status)
    except Exception:
        log.exception("event=internal_error path=%s", request.path)
        return web.json_response({"error": "internal server error", "error_type": "internal"}, status=500)


def api_key_matches(authorization: str, key: str) -> bool:
    """Whether an `Authorization` value, `Bearer KEY` or `Api-Key KEY`, carries `key`.

    The keys are compared as SHA-256 digests with hmac.compare_digest: constant time in their content, and
    of one length whatever was sent, so the time a refusal takes tells nothing about the key.
    """
    scheme, _, given = authorization.partition(" ")
    sent = hashlib.sha256(given.strip().encode(errors="surrogatepass")).digest()
    matches = hmac.compare_digest(sent, hashlib.sha256(key.encode(errors="surrogatepass")).digest())
    return matches and scheme.lower() in ("bearer", "api-key")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """With an API key configured, require `Authorization: Bearer KEY` or `Api-Key KEY`."""
    key = request.app[CONFIG].api_key
    if key and request.path not in PUBLIC_PATHS:
        if not api_key_matches(request.headers.get("Authorization", ""), key):
            raise Unauthorized("missing or invalid API key (send Authorization: Bearer KEY)")
    return await handler(request)


async def read_json(request: web.Request) -> dict:
    """The body as one JSON object, read within --read-timeout and --max-body-bytes.

    aiohttp bounds neither how long a body may take nor, by itself, stops a client that trickles it;
    without the timeout such a client would hold its connection and handler for as long as it liked.
    """
    timeout_s = request.app[CONFIG].read_timeout_s
    try:
        async with asyncio.timeout(timeout_s or None):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {request.client_max_size} bytes") from None
    except TimeoutError:
        raise ReadTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    if not raw:
        raise BadRequest("request body is empty; send a JSON object")
    return decode_json_body(raw)


def tokenize(engine: Replicas, request: GenerationRequest) -> list[int]:
    """Prompt ids: a raw prompt gets the tokenizer's special tokens (BOS); a rendered chat already has them."""
    text = render_prompt(engine.tokenizer, request)
    return engine.tokenizer(text, add_special_tokens=request.messages is None)["input_ids"]


def token_piece(tokenizer, token_id: int) -> str:
    """One token's own text, out of context: SentencePiece's word-boundary marker becomes the space it
    stands for (decoding a lone token drops it); a byte-fallback piece of a character stays U+FFFD."""
    text = tokenizer.decode([token_id])
    if tokenizer.convert_ids_to_tokens(token_id).startswith("\u2581") and not text.startswith(" "):
        return " " + text
    return text


async def predict(request: web.Request) -> web.StreamResponse:
    """`POST /predict`: plain-text streaming deltas by default, or JSON with the text under `output`."""
    engine = request.app[ENGINE]
    parsed = parse_predict_request(await read_json(request), request.app[CONFIG].limits)
    await compile_grammar(parsed.params, engine.tokenizer)
    generation = engine.submit(tokenize(engine, parsed), parsed.params)
    if not parsed.params.stream:
        text = await collect_text(generation)
        return web.json_response(
            {
                "output": text,
                "finish_reason": generation.finish_reason,
                "prompt_tokens": generation.prompt_tokens,
                "generated_tokens": generation.generated_tokens,
            }
        )
    return await stream_text(request, generation)


async def collect_text(generation: Generation) -> str:
    """The whole generated text; cancelling the caller (client gone) cancels the request."""
    events = generation.stream()
    try:
        return "".join([event.text async for event in events])
    finally:
        await events.aclose()


async def stream_text(request: web.Request, generation: Generation) -> web.StreamResponse:
    """Chunked text/plain, one write per token. Headers wait for the first token, so a failure
    before it is still a JSON error; a failure after it cuts the stream short (no final chunk)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "X-Request-Id": generation.id})
    response.enable_chunked_encoding()
    events = generation.stream()
    try:
        async for event in events:
            if not response.prepared:
                await response.prepare(request)
            if event.text:
                await response.write(event.text.encode())
    except RouterError:
        if not response.prepared:
            raise
        log.warning("event=stream_aborted id=%s generated=%d", generation.id, generation.generated_tokens)
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        await events.aclose()
    await response.write_eof()
    return response


def sse_data(payload: dict | str) -> bytes:
    """One server-sent event: `data: <payload>` (a dict as JSON) and the blank line that ends it."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def stream_sse(
    request: web.Request,
    payloads: AsyncGenerator[dict | str, None],
    error_event: Callable[[RouterError], dict],
) -> web.StreamResponse:
    """Server-sent events, one per payload. Headers wait for the first payload, so a failure before it
    is still a JSON error with its status; after it, the failure becomes `error_event(exc)`, the last
    event. Closing `payloads` (done, failed, or client gone) cancels the requests behind them."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        async for payload in payloads:
            if not response.prepared:
                await response.prepare(request)
            await response.write(sse_data(payload))
    except RouterError as exc:
        if not response.prepared:
            raise
        log.warning("event=stream_aborted path=%s error_type=%s", request.path, exc.error_type)
        await response.write(sse_data(error_event(exc)))
    finally:
        await payloads.aclose()
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    """200 when every shard answers and the engine is serving, 503 with the reason otherwise (and
    Retry-After while the shard group restarts). With several shard groups: 200 while one serves,
    `degraded` naming the groups down."""
    engine = request.app[ENGINE]
    if engine.failure is not None:
        exc = engine.unavailable("the shards are unavailable")
        status = "unavailable" if exc.retry_after_s is None else "restarting"
        return web.json_response({"status": status, **error_body(exc)}, status=503, headers=error_headers(exc))
    down = await engine.groups_down()
    if len(down) == len(engine.engines):
        return web.json_response(
            {"status": "unavailable", "error": "a shard does not answer Health", "error_type": "unavailable"},
            status=503,
        )
    if down:
        groups_down = [{"group": group, "error": reason} for group, reason in down.items()]
        return web.json_response({"status": "degraded", "groups_down": groups_down})
    return web.json_response({"status": "ok"})


async def info(request: web.Request) -> web.Response:
    """Model, limits and live counters (KV blocks, queue, steps) of this router."""
    engine = request.app[ENGINE]
    config = request.app[CONFIG]
    scheduler = engine.scheduler
    return web.json_response(
        {
            "model_id": config.model_id,
            "model_dtype": config.dtype,
            "num_shard": config.num_shard,
            "quantize": config.quantize or None,
            "weight_bytes_per_shard": config.weight_bytes_per_shard,
            "version": config.version,
            "max_concurrent_requests": engine.limits.max_concurrent_requests,
            "max_input_tokens": engine.limits.max_input_tokens,
            "max_total_tokens": engine.limits.max_total_tokens,
            "max_batch_prefill_tokens": scheduler.config.max_batch_prefill_tokens,
            "max_batch_total_tokens": scheduler.config.max_batch_total_tokens,
            "block_size": scheduler.config.block_size,
            "kv_blocks_total": scheduler.config.num_blocks,
            "kv_blocks_used": scheduler.num_blocks_used,
            "kv_blocks_free": scheduler.num_blocks_free,
            "kv_blocks_cached": scheduler.num_blocks_cached,
            "prefix_caching": scheduler.config.enable_prefix_caching,
            "prefix_cache_query_tokens": scheduler.prefix_query_tokens,
            "prefix_cache_hit_tokens": scheduler.prefix_hit_tokens,
            "requests_waiting": scheduler.num_waiting,
            "requests_running": scheduler.num_running,
            "steps": sum(e.steps for e in engine.engines),
            "step_sequences": sum(e.step_sequences for e in engine.engines),
            "generated_tokens": sum(e.generated_tokens for e in engine.engines),
            "cancelled_requests": sum(e.cancelled for e in engine.engines),
            "uptime_s": round(time.monotonic() - request.app[STARTED], 1),
            "shard_groups": engine.group_states(),
            # The rest of TGI's /info, for clients that read it.
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_input_length": engine.limits.max_input_tokens,
            "max_best_of": 1,
            "max_stop_sequences": config.limits.max_stop_sequences,
            "max_batch_size": scheduler.config.max_running_requests,
            "router": "mixserve",
            "sha": None,
            "docker_label": None,
        }
    )


def build_app(engine: Engine | Replicas, config: ServerConfig) -> web.Application:
    """The aiohttp application over one engine or several shard groups' (Replicas); the engines must be
    started by the caller."""
    if isinstance(engine, Engine):
        engine = Replicas([engine])
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[errors_middleware, auth_middleware])
    app[ENGINE] = engine
    app[CONFIG] = config
    app[STARTED] = time.monotonic()
    app.router.add_post("/predict", predict)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    install_metrics(app, engine.metrics)
    # Imported here: these modules build on this one's helpers.
    from router import api_openai, api_tgi, openapi

    api_openai.add_routes(app)
    api_tgi.add_routes(app)
    openapi.add_routes(app)
    return app
