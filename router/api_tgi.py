"""The text-generation-inference API: `POST /generate`, `/generate_stream`, `/` (`/tokenize`: router/api_tokenize.py).

Bodies are TGI's `{"inputs": str, "parameters": {...}}`; the `text-generation` client works
unchanged. Sampling follows TGI: greedy unless `do_sample` is true or a warper is set
(`temperature` other than 1, `top_k`, `top_p` below 1, `typical_p`). Streams are SSE `data: {token}`
events, `generated_text` and `details` on the last one, and no `[DONE]`; a failure after the first
event is a last `data: {"error", "error_type"}` event. `decoder_input_details` has the shards score
the prompt (`details.prefill`, the first token's logprob null); `best_of` runs that many sampled
sequences and answers the one of the highest summed token logprob, the others in
`details.best_of_sequences`.
"""

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mixserve.router.detokenizer import token_piece
from mixserve.router.engine_api import EngineAPI, GenerationHandle, TokenEvent
from mixserve.router.errors import BadRequest, RouterError, ValidationError, error_body
from mixserve.router.fields import as_bool, as_float, as_int, as_prompt, as_seed, as_stop
from mixserve.router.http_common import CONFIG, ENGINE, read_json, stream_sse
from mixserve.router.params import (
    DEFAULT_LIMITS,
    MAX_ABS_PENALTY,
    MAX_TOP_K,
    GenerationParams,
    GenerationRequest,
    RequestLimits,
)
from mixserve.router.structured import from_tgi_grammar
from mixserve.router.validation import validate

# TGI's default `max_new_tokens` when left out.
DEFAULT_MAX_NEW_TOKENS = 100


@dataclass(slots=True)
class TGIRequest:
    """A validated TGI body: the input text, how to generate, and what to put in the answer."""

    inputs: str
    params: GenerationParams
    sampling: bool
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    truncate: int | None = None
    best_of: int = 1


def _refuse(parameters: dict[str, Any], name: str, off: tuple[object, ...], why: str) -> None:
    """Refuse `name` unless it is absent, null, or one of its `off` values, of the same JSON type: in Python
    `True == 1` and `0 == False`, yet `"best_of": true` is no more "off" than `"watermark": 0`."""
    value = parameters.get(name)
    if value is not None and not any(isinstance(value, bool) == isinstance(o, bool) and value == o for o in off):
        raise ValidationError(f"{name} is not supported: {why}")


def parse_generate_request(body: dict[str, Any], *, stream: bool, limits: RequestLimits = DEFAULT_LIMITS) -> TGIRequest:
    """Validate a `/generate` or `/generate_stream` body (already decoded JSON) within `limits`; unknown fields
    are ignored."""
    inputs = as_prompt("inputs", body.get("inputs"))
    p = body.get("parameters")
    p = {} if p is None else p
    if not isinstance(p, dict):
        raise BadRequest("parameters must be an object")
    _refuse(p, "watermark", (False,), "no watermarking")
    _refuse(p, "adapter_id", (), "no adapters")
    decoder_input_details = as_bool("decoder_input_details", p.get("decoder_input_details"), default=False)
    if decoder_input_details and stream:
        raise ValidationError("decoder_input_details is not supported when streaming tokens")
    typical_p = p.get("typical_p")
    typical_p = None if typical_p is None else as_float("typical_p", typical_p, gt=0, lt=1)
    temperature = p.get("temperature")
    temperature = None if temperature is None else as_float("temperature", temperature, gt=0)
    top_k = p.get("top_k")
    top_k = None if top_k is None else as_int("top_k", top_k, ge=1, le=MAX_TOP_K)
    top_p = p.get("top_p")
    top_p = None if top_p is None else as_float("top_p", top_p, gt=0, le=1)
    sampling = as_bool("do_sample", p.get("do_sample"), default=False) or (
        temperature not in (None, 1.0) or top_k is not None or top_p not in (None, 1.0) or typical_p is not None
    )
    best_of = as_int("best_of", p.get("best_of"), default=1, ge=1, le=limits.max_best_of)
    if best_of > 1:
        if not sampling:
            raise ValidationError("best_of > 1 needs sampling: set do_sample (or temperature, top_k, top_p, typical_p)")
        if stream:
            raise ValidationError("best_of > 1 is not supported when streaming tokens")
        if p.get("seed") is not None:
            raise ValidationError("seed must not be set when best_of > 1: the sequences would be the same")
    details = as_bool("details", p.get("details"), default=False)
    truncate = p.get("truncate")
    params = GenerationParams(
        max_new_tokens=as_int("max_new_tokens", p.get("max_new_tokens"), default=DEFAULT_MAX_NEW_TOKENS, ge=1),
        temperature=(temperature or 1.0) if sampling else 0.0,
        top_k=top_k or 0,
        top_p=top_p or 1.0,
        repetition_penalty=as_float("repetition_penalty", p.get("repetition_penalty"), default=1.0, gt=0),
        frequency_penalty=as_float(
            "frequency_penalty", p.get("frequency_penalty"), default=0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY
        ),
        stop=as_stop("stop", p.get("stop"), max_count=limits.max_stop_sequences),
        seed=as_seed("seed", p.get("seed")),
        stream=stream,
        top_n_tokens=as_int("top_n_tokens", p.get("top_n_tokens"), default=0, ge=0, le=limits.max_top_n_tokens),
        grammar=from_tgi_grammar(p.get("grammar")),
        typical_p=typical_p or 1.0,
        prompt_logprobs=details and decoder_input_details,
    )
    return TGIRequest(
        inputs=inputs,
        params=params,
        sampling=sampling,
        details=details,
        decoder_input_details=decoder_input_details,
        return_full_text=as_bool("return_full_text", p.get("return_full_text"), default=False),
        truncate=None if truncate is None else as_int("truncate", truncate, ge=1),
        best_of=best_of,
    )


async def submit(engine: EngineAPI, request: TGIRequest) -> list[GenerationHandle]:
    """Tokenize (BOS included, as TGI does), keep the last `truncate` tokens, validate and queue the request's
    `best_of` sequences (each with its own seed); if one is refused, the ones already queued are cancelled."""
    generation_request = GenerationRequest(prompt=request.inputs, messages=None, params=request.params)
    valid = await validate(engine, generation_request, truncate=request.truncate)
    generations: list[GenerationHandle] = []
    try:
        for _ in range(request.best_of):
            generations.append(engine.submit(valid.prompt_ids, valid.params))
    except RouterError:
        for generation in generations:
            engine.cancel(generation)
        raise
    return generations


def token_json(engine: EngineAPI, event: TokenEvent) -> dict[str, Any]:
    """TGI's `Token`: the text this token adds to `generated_text` (a special token's own spelling)."""
    text = event.text
    if event.special and not text:
        text = engine.tokenizer.convert_ids_to_tokens(event.token_id)
    return {"id": event.token_id, "text": text, "logprob": event.logprob, "special": event.special}


def top_tokens_json(engine: EngineAPI, event: TokenEvent) -> list[dict[str, Any]]:
    """The requested alternatives of one position, most likely first."""
    return [
        {
            "id": token_id,
            "text": token_piece(engine.tokenizer, token_id),
            "logprob": logprob,
            "special": token_id in engine.special_ids,
        }
        for token_id, logprob in event.top_tokens
    ]


def _full_text(request: TGIRequest, text: str) -> str:
    return request.inputs + text if request.return_full_text else text


async def _events(generation: GenerationHandle) -> list[TokenEvent]:
    async with aclosing(generation.stream()) as stream:
        return [event async for event in stream]


def _sequence_details(
    engine: EngineAPI, request: TGIRequest, generation: GenerationHandle, events: list[TokenEvent]
) -> dict[str, Any]:
    """One sequence's `details` (TGI's `BestOfSequence` fields less `generated_text`)."""
    prefill = []
    if request.decoder_input_details:
        prefill = [
            {"id": t, "text": token_piece(engine.tokenizer, t), "logprob": logprob}
            for t, logprob in zip(generation.prompt_ids, generation.prompt_logprobs, strict=True)
        ]
    return {
        "finish_reason": generation.finish_reason,
        "generated_tokens": generation.generated_tokens,
        "seed": generation.seed if request.sampling else None,
        "prefill": prefill,
        "tokens": [token_json(engine, e) for e in events],
        "top_tokens": [top_tokens_json(engine, e) for e in events] if request.params.top_n_tokens else [],
        "speculative_proposed": generation.speculative_proposed,
        "speculative_accepted": generation.speculative_accepted,
    }


async def generate_answer(
    engine: EngineAPI, request: TGIRequest, generations: list[GenerationHandle]
) -> dict[str, Any]:
    """TGI's non-streaming response: `generated_text`, and `details` when asked for. Of `best_of` sequences,
    the one of the highest summed token logprob; the others are `details.best_of_sequences`."""
    try:
        runs = await asyncio.gather(*(_events(g) for g in generations))
    finally:
        for generation in generations:  # the others, when one failed
            engine.cancel(generation)
    ranked = sorted(range(len(runs)), key=lambda i: -sum(e.logprob for e in runs[i]))
    best = ranked[0]
    answer: dict[str, Any] = {"generated_text": _full_text(request, "".join(e.text for e in runs[best]))}
    if request.details:
        answer["details"] = _sequence_details(engine, request, generations[best], runs[best])
        if request.best_of > 1:
            answer["details"]["best_of_sequences"] = [
                {
                    "generated_text": _full_text(request, "".join(e.text for e in runs[i])),
                    **_sequence_details(engine, request, generations[i], runs[i]),
                }
                for i in ranked[1:]
            ]
    return answer


async def stream_events(
    engine: EngineAPI, request: TGIRequest, generation: GenerationHandle
) -> AsyncGenerator[dict[str, Any], None]:
    """TGI's `StreamResponse` events: one per token; the last carries `generated_text` and `details`."""
    texts: list[str] = []
    async with aclosing(generation.stream()) as stream:
        async for event in stream:
            texts.append(event.text)
            payload: dict[str, Any] = {
                "index": len(texts),
                "token": token_json(engine, event),
                "top_tokens": top_tokens_json(engine, event),
                "generated_text": None,
                "details": None,
            }
            if event.finish_reason is not None:
                payload["generated_text"] = _full_text(request, "".join(texts))
                if request.details:
                    payload["details"] = {
                        "finish_reason": event.finish_reason,
                        "generated_tokens": generation.generated_tokens,
                        "seed": generation.seed if request.sampling else None,
                        "input_length": generation.prompt_tokens,
                        "speculative_proposed": generation.speculative_proposed,
                        "speculative_accepted": generation.speculative_accepted,
                    }
            yield payload


async def _answer(request: web.Request, body: dict[str, Any], *, stream: bool, as_array: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    parsed = parse_generate_request(body, stream=stream, limits=request.app[CONFIG].limits)
    generations = await submit(engine, parsed)
    if stream:
        return await stream_sse(request, stream_events(engine, parsed, generations[0]), error_body)
    answer = await generate_answer(engine, parsed, generations)
    return web.json_response([answer] if as_array else answer)


async def generate(request: web.Request) -> web.StreamResponse:
    """`POST /generate`: one JSON object."""
    return await _answer(request, await read_json(request), stream=False, as_array=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """`POST /generate_stream`: server-sent token events."""
    return await _answer(request, await read_json(request), stream=True, as_array=False)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """`POST /`: `/generate_stream` when `stream` is true, else `/generate`'s object inside a JSON array."""
    body = await read_json(request)
    stream = as_bool("stream", body.get("stream"), default=False)
    return await _answer(request, body, stream=stream, as_array=True)


def add_routes(app: web.Application) -> None:
    """Register the TGI routes on `app` (built by `router.server.build_app`)."""
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
