"""The OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

Bodies follow OpenAI's reference (defaults: temperature 1, top_p 1, no top-k; temperature 0 is
greedy), plus vLLM's extensions `top_k`, `repetition_penalty`, `ignore_eos` and `min_tokens`.
Unknown fields are ignored. `n` choices are `n` requests to the engine, seeded `seed + i` when a
seed is given. Streams are SSE `data: {chunk}` events ending with `data: [DONE]`; a failure after
the first event is a last `data: {"error": {...}}` event instead. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with this router's `error_type` beside it (router/openai_errors.py).
Bodies are parsed in router/openai_requests.py, the response objects and chunks built in
router/openai_responses.py.
"""

import logging
import time
from dataclasses import replace
from pathlib import PurePath
from typing import Any

from aiohttp import web

from mixserve.router.engine_api import EngineAPI, GenerationHandle
from mixserve.router.errors import BadRequest, RouterError
from mixserve.router.fields import MAX_SEED
from mixserve.router.front_config import ServerConfig
from mixserve.router.http_common import CONFIG, ENGINE, STARTED, read_json, stream_sse
from mixserve.router.openai_errors import ModelNotFound, error_body, openai_errors
from mixserve.router.openai_requests import (
    COMPLETIONS_MAX_TOKENS,
    OpenAIRequest,
    parse_chat_request,
    parse_completion_request,
    prepare_tools,
)
from mixserve.router.openai_responses import Choices, chat_chunks, chat_completion, completion, completion_chunks
from mixserve.router.params import GenerationRequest
from mixserve.router.validation import check_lengths, check_params, prompt_ids, room

log = logging.getLogger("mixserve.router")


def served_names(config: ServerConfig) -> tuple[str, ...]:
    """The names the served model answers to: --served-model-name, else its id and its directory name."""
    if config.served_model_names:
        return config.served_model_names
    model_id = config.model_id
    return tuple(dict.fromkeys((model_id, model_id.rstrip("/"), PurePath(model_id).name)))


def check_model(body: dict[str, Any], config: ServerConfig, *, strict: bool | None = None) -> str:
    """The model name a response reports: the body's `model` when it is one of the served names, else the
    first served name (the model id without --served-model-name). Another name is served by the one model,
    as TGI does, unless `strict` (default: --strict-model-name) makes it a 404."""
    model = body.get("model")
    names = served_names(config)
    default = config.served_model_names[0] if config.served_model_names else config.model_id
    if model is None:
        return default
    if not isinstance(model, str):
        raise BadRequest("model must be a string")
    if model in names:
        return model if config.served_model_names else default
    if config.strict_model_name if strict is None else strict:
        raise ModelNotFound(f"the model {model!r} does not exist; this server serves {default!r}")
    return default


async def submit(engine: EngineAPI, request: OpenAIRequest, default_max_tokens: int | None) -> Choices:
    """Validate (the grammar compiled first) and queue every choice; if one is refused, the ones already queued
    are cancelled. Without a max_tokens of the request or the API, a choice gets all the room its prompt leaves."""
    await check_params(engine, request.params, answer=request.prompts[0].answers_chat)
    generations: list[GenerationHandle] = []
    prompt_tokens = 0
    try:
        for prompt in request.prompts:
            ids = prompt_ids(engine, prompt)
            if request.truncate_prompt_tokens is not None:
                keep = request.truncate_prompt_tokens
                ids = ids[-(engine.stats().limits.max_input_tokens if keep == -1 else keep) :]
            prompt_tokens += len(ids)
            stats = engine.stats()
            max_tokens = request.max_tokens or default_max_tokens or room(stats, len(ids))
            check_lengths(stats, len(ids), max_tokens)
            base = request.params.seed
            for i in range(request.n):
                seed = None if base is None else (base + i) % (MAX_SEED + 1)
                generations.append(engine.submit(ids, replace(request.params, max_new_tokens=max_tokens, seed=seed)))
    except RouterError:
        for generation in generations:
            engine.cancel(generation)
        raise
    texts = [_prompt_text(engine, p) for p in request.prompts for _ in range(request.n)]
    choices = Choices(generations, prompt_tokens, texts, predicted=request.params.prediction is not None)
    if request.request_id is not None:
        choices.id = request.request_id
    return choices


def _prompt_text(engine: EngineAPI, prompt: GenerationRequest) -> str:
    """What echo shows of a completions prompt: its string, or its token ids decoded (special tokens kept)."""
    if prompt.prompt_token_ids is not None:
        return engine.tokenizer.decode(prompt.prompt_token_ids)
    return prompt.prompt or ""


@openai_errors
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`."""
    engine = request.app[ENGINE]
    body = await read_json(request)
    model_id = check_model(body, request.app[CONFIG])
    parsed = parse_chat_request(body, request.app[CONFIG].limits)
    await prepare_tools(parsed, engine.tokenizer)
    choices = await submit(engine, parsed, None)
    if parsed.params.stream:
        return await stream_sse(request, chat_chunks(engine, parsed, choices, model_id), error_body)
    return web.json_response(await chat_completion(engine, parsed, choices, model_id))


@openai_errors
async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions`."""
    engine = request.app[ENGINE]
    body = await read_json(request)
    model_id = check_model(body, request.app[CONFIG])
    parsed = parse_completion_request(body, request.app[CONFIG].limits)
    choices = await submit(engine, parsed, COMPLETIONS_MAX_TOKENS)
    if parsed.params.stream:
        return await stream_sse(request, completion_chunks(engine, parsed, choices, model_id), error_body)
    return web.json_response(await completion(engine, parsed, choices, model_id))


def _model_card(request: web.Request, name: str) -> dict[str, Any]:
    engine = request.app[ENGINE]
    created = int(time.time() - (time.monotonic() - request.app[STARTED]))
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "mixserve",
        "max_model_len": engine.stats().limits.max_total_tokens,
    }


@openai_errors
async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: the served model, once per --served-model-name (or under its id)."""
    config = request.app[CONFIG]
    names = config.served_model_names or (config.model_id,)
    return web.json_response({"object": "list", "data": [_model_card(request, name) for name in names]})


@openai_errors
async def retrieve_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{model}`: the served model under one of its names, or 404 (a lookup, not a request to serve)."""
    name = check_model({"model": request.match_info["model"]}, request.app[CONFIG], strict=True)
    return web.json_response(_model_card(request, name))


def add_routes(app: web.Application) -> None:
    """Register the OpenAI routes on `app` (built by `router.server.build_app`)."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    # Any id, newlines and slashes included, reaches the handler and gets OpenAI's 404 (`.` stops at a newline).
    app.router.add_get(r"/v1/models/{model:[\s\S]+}", retrieve_model)
