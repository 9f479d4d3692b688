"""The router's exceptions: each class carries the HTTP status and the `error_type` the APIs report.

Every error a client can see is one of these; the HTTP, OpenAI, TGI and gRPC fronts map them
to their own framing with `status` and `error_body`, so one request's failure never needs
special-casing per API.
"""

from typing import ClassVar


class RouterError(Exception):
    """Base of every error the router reports to a client; unexpected failures are 500s."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal"


class BadRequest(RouterError):
    """The body is malformed: not JSON, not an object, or a field of the wrong JSON type."""

    status = 400
    error_type = "bad_request"


class Unauthorized(RouterError):
    """The request lacks valid credentials."""

    status = 401
    error_type = "authentication"


class Forbidden(RouterError):
    """The request is refused whoever sends it: a browser's preflight from an origin --cors-allow-origin leaves out."""

    status = 403
    error_type = "forbidden"


class PayloadTooLarge(RouterError):
    """The body, or the prompt once tokenized, exceeds what the server accepts."""

    status = 413
    error_type = "payload_too_large"


class ReadTimeout(RouterError):
    """The client did not send its whole body within --read-timeout."""

    status = 408
    error_type = "read_timeout"


class ValidationError(RouterError):
    """The body is well-formed but a value is out of range or the fields contradict each other."""

    status = 422
    error_type = "validation"


class Overloaded(RouterError):
    """The queue is full; the client should retry later."""

    status = 429
    error_type = "overloaded"


class GenerationError(RouterError):
    """Generation failed on the server side after the request was accepted."""

    status = 500
    error_type = "generation"


class ShardUnavailable(RouterError):
    """No healthy shard group can serve the request right now; `retry_after_s`, when a restart is coming."""

    status = 503
    error_type = "unavailable"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RouterError):
    """The request ran past --request-timeout; it was stopped and its KV blocks freed."""

    status = 504
    error_type = "timeout"


def error_body(exc: RouterError) -> dict[str, str]:
    """The JSON body every API answers an error with: `{"error": message, "error_type": type}`."""
    return {"error": str(exc), "error_type": exc.error_type}


def error_headers(exc: RouterError) -> dict[str, str]:
    """The HTTP headers of an error answer: `Retry-After` when the error knows when to retry."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    return {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}


_JSON_TYPE_NAMES = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def json_type_name(value: object) -> str:
    """A decoded JSON value's type as JSON names it (object, array, string, number, boolean, null), for
    the messages that say what a field got instead."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
