"""`POST /predict`: this router's own API, plain-text streaming deltas by default, or JSON with the
text under `output`."""

import logging
from typing import Any

from aiohttp import web

from mixserve.router.engine_api import GenerationHandle
from mixserve.router.errors import BadRequest, RouterError, json_type_name
from mixserve.router.fields import (
    as_bool,
    as_float,
    as_int,
    as_messages,
    as_prompt,
    as_seed,
    as_stop,
    max_new_tokens_from,
)
from mixserve.router.http_common import CONFIG, ENGINE, client_gone, read_json
from mixserve.router.params import DEFAULT_LIMITS, MAX_TOP_K, GenerationParams, GenerationRequest, RequestLimits
from mixserve.router.structured import from_response_format, from_tgi_grammar, one_spec
from mixserve.router.validation import validate

log = logging.getLogger("mixserve.router")


_PREDICT_DEFAULTS = GenerationParams()


def parse_predict_request(body: dict[str, Any], limits: RequestLimits = DEFAULT_LIMITS) -> GenerationRequest:
    """Validate a `POST /predict` body (already decoded JSON) within `limits`; unknown fields are ignored."""
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {json_type_name(body)}")
    defaults = _PREDICT_DEFAULTS
    params = GenerationParams(
        max_new_tokens=max_new_tokens_from(body, ("max_tokens", "max_new_tokens"), default=defaults.max_new_tokens),
        temperature=as_float("temperature", body.get("temperature"), default=defaults.temperature, ge=0),
        top_p=as_float("top_p", body.get("top_p"), default=defaults.top_p, gt=0, le=1),
        top_k=as_int("top_k", body.get("top_k"), default=defaults.top_k, ge=0, le=MAX_TOP_K),
        repetition_penalty=as_float(
            "repetition_penalty", body.get("repetition_penalty"), default=defaults.repetition_penalty, gt=0
        ),
        stop=as_stop("stop", body.get("stop"), max_count=limits.max_stop_sequences),
        seed=as_seed("seed", body.get("seed")),
        stream=as_bool("stream", body.get("stream"), default=defaults.stream),
        grammar=one_spec([from_tgi_grammar(body.get("grammar")), from_response_format(body.get("response_format"))]),
        priority=as_int("priority", body.get("priority"), default=0),
    )
    prompt, messages = body.get("prompt"), body.get("messages")
    return GenerationRequest(
        prompt=None if prompt is None else as_prompt("prompt", prompt),
        messages=None if messages is None else as_messages("messages", messages),
        params=params,
    )


async def predict(request: web.Request) -> web.StreamResponse:
    """`POST /predict`."""
    engine = request.app[ENGINE]
    parsed = parse_predict_request(await read_json(request), request.app[CONFIG].limits)
    valid = await validate(engine, parsed)
    generation = engine.submit(valid.prompt_ids, valid.params)
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


async def collect_text(generation: GenerationHandle) -> str:
    """The whole generated text; cancelling the caller (client gone) cancels the request."""
    events = generation.stream()
    try:
        return "".join([event.text async for event in events])
    finally:
        await events.aclose()


async def stream_text(request: web.Request, generation: GenerationHandle) -> web.StreamResponse:
    """Chunked text/plain, one write per token. Headers wait for the first token, so a failure before it
    is still a JSON error; a failure after it cuts the stream short (no final chunk)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "X-Request-Id": generation.id})
    response.enable_chunked_encoding()
    events = generation.stream()
    try:
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
    except ConnectionResetError:
        # The client went away between two tokens or before the stream's end (before aiohttp noticed and
        # cancelled the handler), as the server-sent event streams meet it: the request is cancelled as
        # `events` closes.
        client_gone(request)
    return response


def add_routes(app: web.Application) -> None:
    """Register `/predict` on `app` (built by `router.server.build_app`)."""
    app.router.add_post("/predict", predict)
