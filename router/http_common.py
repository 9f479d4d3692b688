"""What the HTTP fronts share: the app's keys, reading a JSON body, error responses and server-sent events."""

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable

from aiohttp import web

from mixserve.router.engine_api import EngineAPI
from mixserve.router.errors import BadRequest, PayloadTooLarge, ReadTimeout, RouterError, error_body, error_headers
from mixserve.router.fields import decode_json_body
from mixserve.router.front_config import ServerConfig

log = logging.getLogger("mixserve.router")

ENGINE = web.AppKey("engine", EngineAPI)
CONFIG = web.AppKey("config", ServerConfig)
STARTED = web.AppKey("started", float)


def error_response(exc: RouterError) -> web.Response:
    """A RouterError as JSON `{"error", "error_type"}` with its status (and Retry-After when it has one)."""
    return web.json_response(error_body(exc), status=exc.status, headers=error_headers(exc))


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
    except ConnectionResetError:
        # The client went away between two events or before the stream's end (before aiohttp noticed and
        # cancelled the handler): its requests are cancelled as `payloads` closes, and there is no one
        # left to answer.
        client_gone(request)
    return response


def client_gone(request: web.Request) -> None:
    """Log a stream whose client left before its end: no error of the server's (metrics count it by the
    status already sent)."""
    log.info("event=client_gone path=%s", request.path)
