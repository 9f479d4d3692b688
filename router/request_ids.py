"""Clients' request ids: `X-Request-Id` (the header vLLM, gateways and proxies use) on HTTP, metadata
`x-request-id` on gRPC.

A front sets the id for the request it is handling (`taken`); each request it submits meanwhile keeps it
(router/generation.py reads `current` when the request is created, in the front's task), and the router's
log lines of that request carry it beside the router's own id (`event=finished id=req-7 request_id=...`),
so a client's or a gateway's id finds the request in the log. The HTTP answer carries the id back
(router/server.py). An id is 1 to 128 visible ASCII characters (no spaces): it is written into key=value log
lines as it is; anything else is a 400.
"""

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar

from mixserve.router.errors import BadRequest

HEADER = "X-Request-Id"
METADATA_KEY = "x-request-id"
_ID = re.compile(r"[\x21-\x7e]{1,128}")

current: ContextVar[str | None] = ContextVar("client_request_id", default=None)


def valid(value: str) -> bool:
    """Whether `value` is a request id as this server takes one."""
    return _ID.fullmatch(value) is not None


def check(value: str) -> str:
    """`value` if it is a valid request id; BadRequest otherwise."""
    if not valid(value):
        raise BadRequest(f"{HEADER} must be 1 to 128 visible ASCII characters (no spaces)")
    return value


@contextlib.contextmanager
def taken(value: str | None) -> Iterator[None]:
    """The client's id (None: it sent none) for the requests submitted within."""
    if value is None:
        yield
        return
    token = current.set(check(value))
    try:
        yield
    finally:
        current.reset(token)


def log_field(request_id: str | None) -> str:
    """What a log line of a request adds: ` request_id=ID`, or nothing where the client sent none."""
    return "" if request_id is None else f" request_id={request_id}"
