"""Cross-origin requests from browsers (`--cors-allow-origin`, TGI's flag): which web pages may call the API.

Without the flag nothing is added, so browsers let no page of another origin read an answer. With it, an
answer to a request whose `Origin` is allowed carries `Access-Control-Allow-Origin` (errors and streams
included: the header is set as the response is prepared, before a stream's first byte), and a browser's
preflight (`OPTIONS` with `Access-Control-Request-Method`) on any route is answered here, before the API key
check: a preflight never carries the key. A preflight from an origin left out is a 403 naming it. `*`
allows every origin (the header is then `*`, and a browser sends no cookies, which the API does not read).
"""

from collections.abc import Iterable

from aiohttp import web

from mixserve.router.errors import Forbidden
from mixserve.router.http_common import CONFIG

ANY_ORIGIN = "*"
ALLOW_METHODS = "GET, POST, OPTIONS"
# Headers a page's script may read besides the safelisted ones: when to retry after a 429 or 503, and the
# request id it sent (router/request_ids.py).
EXPOSE_HEADERS = "Retry-After, X-Request-Id"
# How long a browser may reuse a preflight's answer.
MAX_AGE_S = 600


def allows(origins: Iterable[str], origin: str) -> bool:
    """Whether a request from `origin` may read the answers, under the allowed `origins`."""
    return ANY_ORIGIN in origins or origin in origins


@web.middleware
async def preflight_middleware(request: web.Request, handler):
    """Answer a browser's preflight for an allowed origin (204), refuse one for another (403)."""
    origins = request.app[CONFIG].cors_allow_origins
    origin = request.headers.get("Origin")
    if not (origins and origin and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers):
        return await handler(request)
    if not allows(origins, origin):
        raise Forbidden(
            f"origin {origin!r} may not call this server (allowed: --cors-allow-origin {' '.join(origins)})"
        )
    headers = {
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Max-Age": str(MAX_AGE_S),
    }
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = requested
    return web.Response(status=204, headers=headers)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: let an allowed origin's page read this answer."""
    origins = request.app[CONFIG].cors_allow_origins
    origin = request.headers.get("Origin")
    if not origins or origin is None:
        return
    if ANY_ORIGIN not in origins:
        response.headers.add("Vary", "Origin")  # allowed or not, the answer differs by origin: caches key on it
    if not allows(origins, origin):
        return
    response.headers["Access-Control-Allow-Origin"] = ANY_ORIGIN if ANY_ORIGIN in origins else origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS


def install(app: web.Application) -> None:
    """Add the headers to every answer of `app` (its preflight middleware is in router/server.py's list)."""
    app.on_response_prepare.append(add_cors_headers)
