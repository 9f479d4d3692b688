"""`POST /predict`: this router's own API, plain-text streaming deltas by default, or JSON with the
text under `output`."""

import logging

from aiohttp import web

from mixserve.router.engine_api import GenerationHandle
from mixserve.router.errors import RouterError
from mixserve.router.http_common import CONFIG, ENGINE, read_json
from mixserve.router.params import parse_predict_request
from mixserve.router.validation import validate

log = logging.getLogger("mixserve.router")


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
    except ConnectionResetError:
        # The client went away between two tokens (before aiohttp noticed and cancelled the handler), as
        # the server-sent event streams meet it (http_common.py): the request is cancelled as `events` closes.
        log.info("event=client_gone path=%s", request.path)
        return response
    finally:
        await events.aclose()
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    """Register `/predict` on `app` (built by `router.server.build_app`)."""
    app.router.add_post("/predict", predict)
