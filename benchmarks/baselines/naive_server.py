"""The naive baseline: a Mixtral deployment as mixserve replaces it.

transformers `generate` on a model placed by accelerate (`device_map`), streamed through a
`TextIteratorStreamer` that a generation thread fills, one request at a time (a lock around
the whole generation: no batching). Routes:

- `POST /predict`: `prompt`, `max_tokens` / `max_new_tokens` (128), `temperature` (1.0; 0 is
  greedy), `stream` (true: chunked text deltas; false: JSON with `output`), `ignore_eos`.
- `POST /v1/completions`: the OpenAI shape of the same, so the load generator drives it as it
  drives vLLM (`stream_options.include_usage` gives exact token counts; `ignore_eos` honored).
- `GET /health`.

The streamer emits text as transformers decides (whole words), so one chunk may hold several
tokens: that is what clients of such a deployment see.

    python -m benchmarks.baselines.naive_server --model DIR --port 8081
"""

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

log = logging.getLogger("mixserve.naive")


class BadRequest(Exception):
    """The caller's mistake; answered 400."""


@dataclass(slots=True)
class Completion:
    """One request's parameters, then its outcome (filled in by the generation thread)."""

    prompt: str
    max_new_tokens: int
    temperature: float
    ignore_eos: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""

    @property
    def finish_reason(self) -> str:
        return "length" if self.completion_tokens >= self.max_new_tokens else "stop"


def parse_completion(body: object, default_max_tokens: int, default_temperature: float) -> Completion:
    """The fields both routes share, checked for type and range."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string")
    max_tokens = body.get("max_tokens", body.get("max_new_tokens", default_max_tokens))
    temperature = body.get("temperature", default_temperature)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens must be an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise BadRequest("temperature must be a number >= 0")
    return Completion(prompt, max_tokens, float(temperature), bool(body.get("ignore_eos", False)))


class NaiveGenerator:
    """The model, its tokenizer, and the lock that makes it serve one request at a time."""

    def __init__(self, model_dir: str, device_map: str = "auto") -> None:
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device_map)
        self.model.eval()
        self.lock = asyncio.Lock()

    def _generate(self, completion: Completion, streamer: TextIteratorStreamer) -> None:
        """The generation thread: fills the streamer, records the token counts, always ends the stream."""
        try:
            inputs = self.tokenizer(completion.prompt, return_tensors="pt").to(self.model.device)
            completion.prompt_tokens = inputs["input_ids"].shape[1]
            sampling = {"do_sample": False}
            if completion.temperature > 0:
                sampling = {"do_sample": True, "temperature": completion.temperature}
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    streamer=streamer,
                    max_new_tokens=completion.max_new_tokens,
                    # min_new_tokens suppresses EOS until the length is reached: ignore_eos as vLLM has it.
                    min_new_tokens=completion.max_new_tokens if completion.ignore_eos else None,
                    pad_token_id=self.tokenizer.eos_token_id,
                    **sampling,
                )
            completion.completion_tokens = output.shape[1] - completion.prompt_tokens
        except Exception as exc:
            log.exception("event=generate_failed")
            completion.error = repr(exc)
            streamer.on_finalized_text("", stream_end=True)

    async def stream(self, completion: Completion) -> AsyncIterator[str]:
        """Text deltas as the streamer releases them; the lock is held until generation ends."""
        async with self.lock:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            thread = threading.Thread(target=self._generate, args=(completion, streamer), daemon=True)
            thread.start()
            loop = asyncio.get_running_loop()
            try:
                while (text := await loop.run_in_executor(None, next, streamer, None)) is not None:
                    if text:
                        yield text
            finally:
                # A client that left does not stop `generate`; the next request waits for it.
                await loop.run_in_executor(None, thread.join)
        if completion.error:
            raise RuntimeError(completion.error)


GENERATOR = web.AppKey("generator", NaiveGenerator)


def _error(status: int, message: str) -> web.Response:
    error_type = "bad_request" if status < 500 else "internal"
    return web.json_response({"error": message, "error_type": error_type}, status=status)


async def _body(request: web.Request) -> dict:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


async def predict(request: web.Request) -> web.StreamResponse:
    """`POST /predict`: chunked plain-text deltas, or JSON with the text under `output`."""
    generator = request.app[GENERATOR]
    try:
        body = await _body(request)
        completion = parse_completion(body, 128, 1.0)
    except BadRequest as exc:
        return _error(400, str(exc))
    if not body.get("stream", True):
        text = "".join([t async for t in generator.stream(completion)])
        return web.json_response(
            {
                "output": text,
                "finish_reason": completion.finish_reason,
                "prompt_tokens": completion.prompt_tokens,
                "generated_tokens": completion.completion_tokens,
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    async for text in generator.stream(completion):
        await response.write(text.encode())
    await response.write_eof()
    return response


def _completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }


def _usage(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions`: OpenAI's legacy completions, SSE when `stream` is true."""
    generator = request.app[GENERATOR]
    try:
        body = await _body(request)
        completion = parse_completion(body, 16, 1.0)
    except BadRequest as exc:
        return _error(400, str(exc))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    model = str(body.get("model") or generator.model_dir)
    if not body.get("stream", False):
        text = "".join([t async for t in generator.stream(completion)])
        answer = _completion_chunk(request_id, model, text, completion.finish_reason)
        return web.json_response({**answer, "usage": _usage(completion)})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(event: dict | str) -> None:
        data = event if isinstance(event, str) else json.dumps(event)
        await response.write(f"data: {data}\n\n".encode())

    async for text in generator.stream(completion):
        await send(_completion_chunk(request_id, model, text, None))
    await send(_completion_chunk(request_id, model, "", completion.finish_reason))
    if (body.get("stream_options") or {}).get("include_usage"):
        await send({**_completion_chunk(request_id, model, "", None), "choices": [], "usage": _usage(completion)})
    await send("[DONE]")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(generator: NaiveGenerator) -> web.Application:
    """The aiohttp application around one generator."""
    app = web.Application()
    app[GENERATOR] = generator
    app.router.add_post("/predict", predict)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="naive_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--device-map", default="auto", help="accelerate device_map (auto: GPUs if any, else CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s naive %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = NaiveGenerator(args.model, args.device_map)
    log.info("event=serving address=http://%s:%d model=%s", args.host, args.port, args.model)
    web.run_app(build_app(generator), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
