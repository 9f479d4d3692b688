"""Amazon SageMaker's container contract, as TGI and vLLM serve it: `GET /ping` and `POST /invocations`.

SageMaker probes `/ping` without credentials (it answers as `/health` does, and needs no API key), and sends
every request to `/invocations`, whose body says which API it speaks: `messages` a chat completion, `prompt`
a completion (OpenAI's routes, as vLLM reads such bodies), `inputs` TGI's `POST /` (`/generate` inside a
JSON array, or `/generate_stream` with `stream`).
"""

from aiohttp import web

from mixserve.router.api_info import health
from mixserve.router.api_openai import chat_completions, completions
from mixserve.router.api_tgi import compat_generate
from mixserve.router.errors import BadRequest
from mixserve.router.http_common import read_json

# The key that names each API, checked in this order, and the route that serves it.
_ROUTES = (("messages", chat_completions), ("prompt", completions), ("inputs", compat_generate))


async def invocations(request: web.Request) -> web.StreamResponse:
    """`POST /invocations`: the body served by the route its keys name (the body is read once: aiohttp keeps it)."""
    body = await read_json(request)
    for key, route in _ROUTES:
        if key in body:
            return await route(request)
    raise BadRequest("an /invocations body needs messages (chat), prompt (completions) or inputs (TGI)")


def add_routes(app: web.Application) -> None:
    """Register `/ping` and `/invocations` on `app` (built by `router.server.build_app`)."""
    app.router.add_get("/ping", health)
    app.router.add_post("/invocations", invocations)
