"""The APIs the load generator can drive, one class each: the transport, how to ask for a
streamed completion, and how to read the stream into a RequestRecord.

Reading is deliberately light (the client shares the cores with the server under test): each
token chunk is timed on arrival, and only small SSE events or protobuf messages are decoded.
A target is an async context manager: one HTTP session (or gRPC channel) serves every request.
A request with a JSON schema asks for it as the API spells it (`/predict` and TGI `grammar`, OpenAI
`response_format`, gRPC `Grammar`) and never with ignore_eos; openai and tgi keep its text and finish reason.

What is timed, and how tokens are counted:
- `predict` (mixserve `/predict`, chunked text/plain): the server writes one HTTP chunk per
  token whose text is not empty, and aiohttp keeps chunk boundaries, so chunks count tokens;
  tokens with no text of their own (part of a UTF-8 character, a special token) are not seen.
  That lower bound is replaced by mixserve's exact count from `/info` (`generated_tokens`,
  read before and after each level). Re-tokenizing the final text is no fix: a random-weight
  model's output re-encodes to up to 20 % more tokens than were generated.
- `openai` (`/v1/completions`): events carrying text are timed; `usage.completion_tokens`
  (asked for with `stream_options.include_usage`) is exact; without usage, text events count.
- `tgi` (`/generate_stream`): one SSE event per token, `details.generated_tokens` at the end.
- `grpc` (mixserve's GenerationService.GenerateStream): one message per token, each carrying
  the running `generated_tokens`.
"""

import abc
import json
import time
from typing import Any, ClassVar

import aiohttp

from mixserve.benchmarks.metrics import RequestRecord
from mixserve.benchmarks.workload import BenchRequest


class StreamError(Exception):
    """The stream broke the API's framing or carried an error event."""


class Target(abc.ABC):
    """One API of one server: open it, send requests through it, close it."""

    name: ClassVar[str]

    def __init__(
        self,
        url: str,
        model_name: str = "",
        temperature: float = 0.0,
        ignore_eos: bool = True,
        keepalive: bool = True,
        timeout_s: float = 600.0,
        top_p: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.keepalive = keepalive
        self.timeout_s = timeout_s
        self.top_p = top_p

    async def __aenter__(self) -> "Target":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    @abc.abstractmethod
    async def send(self, request: BenchRequest) -> RequestRecord:
        """Send one request and read its stream; every failure ends up in the record, never raised."""

    async def generated_tokens(self) -> int | None:
        """The server's running count of generated tokens, where it publishes one."""
        return None


class HTTPTarget(Target):
    """An HTTP API over one aiohttp session; subclasses give the route, the body and the reader."""

    path: ClassVar[str]
    session: aiohttp.ClientSession

    async def __aenter__(self) -> "HTTPTarget":
        connector = aiohttp.TCPConnector(limit=0, force_close=not self.keepalive)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()

    @abc.abstractmethod
    def body(self, request: BenchRequest) -> dict[str, Any]:
        """The JSON body asking for `request` as a stream."""

    @abc.abstractmethod
    async def read(self, response: aiohttp.ClientResponse, record: RequestRecord, sent: float) -> None:
        """Consume a 200 response: append each token chunk's arrival (seconds after `sent`), set
        `output_tokens` and `count_method`; raise StreamError on a malformed stream."""

    async def send(self, request: BenchRequest) -> RequestRecord:
        return await self.post(request, self.body(request))

    async def post(self, request: BenchRequest, body: dict[str, Any]) -> RequestRecord:
        """Send `body` for `request` and read the answer into its record (never raises on a failure)."""
        record = RequestRecord(request.prompt_tokens, request.max_tokens)
        sent = time.perf_counter()
        try:
            async with self.session.post(self.url + self.path, json=body) as response:
                record.status = response.status
                if response.status != 200:
                    record.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                else:
                    await self.read(response, record, sent)
                    record.ok = True
        except (aiohttp.ClientError, TimeoutError, StreamError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        record.e2e = time.perf_counter() - sent
        return record

    async def generated_tokens(self) -> int | None:
        """mixserve's `/info` counter; None where the server has no such field."""
        try:
            async with self.session.get(f"{self.url}/info") as response:
                if response.status != 200:
                    return None
                value = (await response.json(content_type=None)).get("generated_tokens")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int) else None


class PredictTarget(HTTPTarget):
    """mixserve `POST /predict` (and the naive baseline's): plain-text deltas, one HTTP chunk per token."""

    name = "predict"
    path = "/predict"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,  # /predict's own default is 0.95
            "stream": True,
        }
        if request.json_schema is not None:
            body["grammar"] = {"type": "json", "value": request.json_schema}
        elif self.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def read(self, response: aiohttp.ClientResponse, record: RequestRecord, sent: float) -> None:
        chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        pending = False
        async for data, end_of_http_chunk in response.content.iter_chunks():
            pending = pending or bool(data)
            if pending and (end_of_http_chunk or not chunked):
                record.token_times.append(time.perf_counter() - sent)
                pending = False
        record.output_tokens = len(record.token_times)
        record.count_method = "http_chunks" if chunked else "reads"


async def _sse_events(response: aiohttp.ClientResponse):
    """The `data:` payloads of a server-sent-events stream, as bytes."""
    async for line in response.content:
        if line.startswith(b"data:"):
            yield line[5:].strip()


class OpenAICompletionsTarget(HTTPTarget):
    """OpenAI `POST /v1/completions` with `stream: true`: mixserve, vLLM, transformers serve, the baseline."""

    name = "openai"
    path = "/v1/completions"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.json_schema is not None:
            schema = {"name": "bench", "schema": request.json_schema, "strict": True}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif self.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def read(self, response: aiohttp.ClientResponse, record: RequestRecord, sent: float) -> None:
        usage, parts = None, []
        async for payload in _sse_events(response):
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise StreamError(f"error event: {event['error']}")
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                record.token_times.append(time.perf_counter() - sent)
                parts.append(choices[0]["text"])
            if choices and choices[0].get("finish_reason"):
                record.finish_reason = choices[0]["finish_reason"]
            usage = event.get("usage") or usage
        else:
            raise StreamError("stream ended without data: [DONE]")
        record.text = "".join(parts)
        if usage is not None:
            record.output_tokens, record.count_method = usage["completion_tokens"], "usage"
        else:
            record.output_tokens, record.count_method = len(record.token_times), "sse_chunks"


class TGIStreamTarget(HTTPTarget):
    """TGI `POST /generate_stream`: one SSE event per token; the last one carries `details`.

    TGI's API has no ignore_eos; lengths are fixed only where the model does not end early.
    """

    name = "tgi"
    path = "/generate_stream"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        parameters: dict[str, Any] = {"max_new_tokens": request.max_tokens, "details": True}
        if self.temperature > 0:
            parameters.update(do_sample=True, temperature=self.temperature)
            if self.top_p < 1:  # TGI refuses a top_p of 1
                parameters["top_p"] = self.top_p
        if request.json_schema is not None:
            parameters["grammar"] = {"type": "json", "value": request.json_schema}
        return {"inputs": request.prompt, "parameters": parameters}

    async def read(self, response: aiohttp.ClientResponse, record: RequestRecord, sent: float) -> None:
        events, details, parts = 0, None, []
        async for payload in _sse_events(response):
            event = json.loads(payload)
            if "error" in event:
                raise StreamError(f"error event: {event['error']}")
            if event.get("token") is not None:
                events += 1
                record.token_times.append(time.perf_counter() - sent)
                if not event["token"].get("special"):
                    parts.append(event["token"].get("text", ""))
            details = event.get("details") or details
        if details is None:
            raise StreamError("stream ended without a final event carrying details")
        record.text, record.finish_reason = "".join(parts), details.get("finish_reason", "")
        record.output_tokens, record.count_method = details["generated_tokens"], "details"
        if record.output_tokens != events:
            raise StreamError(f"details say {record.output_tokens} tokens, the stream had {events}")


class GrpcTarget(Target):
    """mixserve's public gRPC GenerationService.GenerateStream; the url is `host:port` (a scheme is dropped)."""

    name = "grpc"

    async def __aenter__(self) -> "GrpcTarget":
        import grpc.aio

        from mixserve_pb import generate_pb2, generate_pb2_grpc

        self._pb = generate_pb2
        self._errors = (grpc.aio.AioRpcError,)
        self.channel = grpc.aio.insecure_channel(self.url.split("://", 1)[-1])
        self.stub = generate_pb2_grpc.GenerationServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.channel.close()

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(request.prompt_tokens, request.max_tokens)
        constrained = request.json_schema is not None
        parameters = self._pb.GenerationParameters(
            max_new_tokens=request.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            ignore_eos=self.ignore_eos and not constrained,
            grammar=self._pb.Grammar(type="json", value=json.dumps(request.json_schema)) if constrained else None,
        )
        sent = time.perf_counter()
        try:
            call = self.stub.GenerateStream(
                self._pb.GenerateRequest(prompt=request.prompt, parameters=parameters), timeout=self.timeout_s
            )
            last = None
            async for message in call:
                record.token_times.append(time.perf_counter() - sent)
                last = message
            if last is None or last.finish_reason == self._pb.FINISH_REASON_UNSPECIFIED:
                raise StreamError("stream ended without a message carrying the finish reason")
            record.output_tokens, record.count_method = last.generated_tokens, "generated_tokens"
            record.ok = True
        except self._errors as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
        except StreamError as exc:
            record.error = f"StreamError: {exc}"
        record.e2e = time.perf_counter() - sent
        return record


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (PredictTarget, OpenAICompletionsTarget, TGIStreamTarget, GrpcTarget)
}
