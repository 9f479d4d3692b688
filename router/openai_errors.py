"""Errors in OpenAI's shape for the OpenAI fronts (router/api_openai.py, router/api_responses.py): the error
object, the handler wrapper that answers a RouterError with it, and the unknown-model error."""

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mixserve.router.errors import RouterError, error_headers

log = logging.getLogger("mixserve.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ModelNotFound(RouterError):
    """The body names a model this router does not serve."""

    status = 404
    error_type = "not_found"
    # OpenAI's code and the field at fault.
    code = "model_not_found"
    param = "model"


def error_body(exc: RouterError) -> dict[str, Any]:
    """OpenAI's error object, with the router's `error_type` kept beside it."""
    if exc.status == 401:
        kind = "authentication_error"
    elif exc.status == 429:
        kind = "rate_limit_error"
    elif exc.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    code, param = getattr(exc, "code", exc.error_type), getattr(exc, "param", None)
    error = {"message": str(exc), "type": kind, "param": param, "code": code}
    return {"error": error, "error_type": exc.error_type}


def openai_errors(handler: Handler) -> Handler:
    """Answer the handler's RouterErrors in OpenAI's shape (the app's middleware would use the TGI one)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except RouterError as exc:
            log.info("event=refused path=%s status=%d error_type=%s", request.path, exc.status, exc.error_type)
            return web.json_response(error_body(exc), status=exc.status, headers=error_headers(exc))

    return wrapped
