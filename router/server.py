"""The router's HTTP app: the factory that puts the fronts together, and the middlewares they share.

Each API is a front module with its own routes: `/predict` (api_predict), `/health` and `/info`
(api_info), the OpenAI (api_openai; its Responses API in api_responses) and TGI (api_tgi) APIs, SageMaker's
routes over them (api_sagemaker), the
spec (openapi) and `/metrics` (api_metrics). They reach the engine only through router/engine_api.py's
interface and validate with router/validation.py; their shared HTTP helpers are router/http_common.py.
"""

import logging
import time

from aiohttp import web

from mixserve.router import (
    api_info,
    api_metrics,
    api_openai,
    api_predict,
    api_responses,
    api_sagemaker,
    api_tgi,
    api_tokenize,
    cors,
    openapi,
    request_ids,
)
from mixserve.router.api_openai import served_names
from mixserve.router.engine_api import EngineAPI
from mixserve.router.errors import PayloadTooLarge, RouterError, Unauthorized
from mixserve.router.front_config import ServerConfig, api_key_matches
from mixserve.router.http_common import CONFIG, ENGINE, STARTED, error_response

log = logging.getLogger("mixserve.router")

# Routes that answer without an API key: probes from load balancers and orchestrators (SageMaker's /ping).
PUBLIC_PATHS = frozenset({"/health", "/ping"})


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


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    """A client's X-Request-Id stays with the requests this one submits (router/request_ids.py)."""
    with request_ids.taken(request.headers.get(request_ids.HEADER)):
        return await handler(request)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the answer carries the client's X-Request-Id back (a valid one; else it was a 400)."""
    value = request.headers.get(request_ids.HEADER)
    if value is not None and request_ids.valid(value):
        response.headers[request_ids.HEADER] = value


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """With an API key configured, require `Authorization: Bearer KEY` or `Api-Key KEY`."""
    key = request.app[CONFIG].api_key
    if key and request.path not in PUBLIC_PATHS:
        if not api_key_matches(request.headers.get("Authorization", ""), key):
            raise Unauthorized("missing or invalid API key (send Authorization: Bearer KEY)")
    return await handler(request)


def build_app(engine: EngineAPI, config: ServerConfig) -> web.Application:
    """The aiohttp application over `engine` (router.replicas.Replicas), which the caller starts."""
    # A browser's preflight is answered before the key check: it never carries the key.
    middlewares = [errors_middleware, cors.preflight_middleware, request_id_middleware, auth_middleware]
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[ENGINE] = engine
    app[CONFIG] = config
    app[STARTED] = time.monotonic()
    api_predict.add_routes(app)
    api_info.add_routes(app)
    api_metrics.install(app, engine.metrics, served_names(config)[0] if config.vllm_metrics else None)
    api_openai.add_routes(app)
    api_responses.add_routes(app)
    api_tgi.add_routes(app)
    api_sagemaker.add_routes(app)
    api_tokenize.add_routes(app)
    openapi.add_routes(app)
    cors.install(app)
    app.on_response_prepare.append(echo_request_id)
    return app
