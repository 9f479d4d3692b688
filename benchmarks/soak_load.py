"""The soak's request mix: every API streamed and not, the features a batch mixes (JSON schemas, tool
calls, predicted outputs, choices with logprobs; benchmarks/soak_targets.py), cancelled streams, invalid
and over-limit bodies.

Each kind of request knows what a correct answer to it is, and every request ends in exactly one
outcome:
- `ok`: a generation that finished (200, a complete body or stream);
- `refused`: an invalid or over-limit body answered with the 4xx it deserves and a JSON error;
- `cancelled`: a stream the client closed after a few chunks, as a client that goes away does;
- `unexpected`: an answer, but the wrong one (another status, any 5xx, an error event, a body that is not
  what the request asked for);
- `lost`: no whole answer at all (connection dropped, timed out, a stream cut short).

The generation kinds reuse the load generator's targets (`benchmarks.targets`) for the request
and its reading; the kinds here add only what those do not send.
"""

import json
import random
import time
from dataclasses import dataclass

import aiohttp

from mixserve.benchmarks.metrics import RequestRecord
from mixserve.benchmarks.soak_targets import (
    ChatJSONTarget,
    ChatSchemaTarget,
    ChatStreamTarget,
    ChatToolsTarget,
    ChoicesLogprobsTarget,
    CompletionsJSONTarget,
    PredictionTarget,
    PredictJSONTarget,
)
from mixserve.benchmarks.targets import HTTPTarget, OpenAICompletionsTarget, PredictTarget, TGIStreamTarget
from mixserve.benchmarks.workload import BenchRequest

OUTCOMES = ("ok", "refused", "cancelled", "unexpected", "lost")
# The routes the mix sends to; the server's request counters for these are compared with ours.
ROUTES = ("/predict", "/v1/completions", "/v1/chat/completions", "/generate_stream")
# Relative frequency of each kind. Generations dominate, as in real traffic; the rest recur often
# enough that a leak on their path would show in a few minutes.
WEIGHTS: dict[str, int] = {
    "predict_stream": 2,
    "predict_json": 2,
    "completions_stream": 2,
    "completions_json": 2,
    "chat_stream": 2,
    "chat_json": 2,
    "generate_stream": 2,
    "chat_schema": 2,
    "chat_tools": 2,
    "completions_prediction": 2,
    "completions_logprobs": 2,
    "cancelled_stream": 3,
    "invalid_body": 2,
    "over_limit": 2,
}
KINDS = tuple(WEIGHTS)


@dataclass(slots=True)
class Outcome:
    """How one request of the soak ended."""

    kind: str
    outcome: str
    status: int
    detail: str
    sent_at: float
    seconds: float

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "outcome": self.outcome,
            "status": self.status,
            "detail": self.detail[:300],
            "sent_at_s": round(self.sent_at, 3),
            "seconds": round(self.seconds, 3),
        }


@dataclass(slots=True, frozen=True)
class ServerLimits:
    """The bounds the over-limit requests step over (from /info, and --max-body-bytes)."""

    max_total_tokens: int
    max_stop_sequences: int
    max_body_bytes: int


def kind_schedule(index: int, seed: int) -> str:
    """The kind of the `index`-th request: one of each first (so a short soak covers them all), then
    drawn by weight from a generator seeded by (seed, index), the same whatever order workers ask in."""
    if index < len(KINDS):
        return KINDS[index]
    rng = random.Random(f"{seed}:{index}")
    return rng.choices(KINDS, weights=[WEIGHTS[k] for k in KINDS])[0]


GENERATIONS: dict[str, type[HTTPTarget]] = {
    "predict_stream": PredictTarget,
    "predict_json": PredictJSONTarget,
    "completions_stream": OpenAICompletionsTarget,
    "completions_json": CompletionsJSONTarget,
    "chat_stream": ChatStreamTarget,
    "chat_json": ChatJSONTarget,
    "generate_stream": TGIStreamTarget,
    "chat_schema": ChatSchemaTarget,
    "chat_tools": ChatToolsTarget,
    "completions_prediction": PredictionTarget,
    "completions_logprobs": ChoicesLogprobsTarget,
}


def generation_outcome(kind: str, record: RequestRecord, sent_at: float) -> Outcome:
    """A generation's record as an outcome: any status but 200, or an error event, is unexpected; a
    200 whose stream broke off, or no answer at all, is lost."""
    if record.ok:
        outcome = "ok"
    elif record.status not in (0, 200) or record.error.startswith(("StreamError: error event", "WrongAnswer")):
        outcome = "unexpected"
    else:
        outcome = "lost"
    return Outcome(kind, outcome, record.status, record.error, sent_at, record.e2e)


class SoakClient:
    """Sends the soak's requests over one aiohttp session, shared with the generation targets."""

    def __init__(
        self,
        url: str,
        model_name: str,
        limits: ServerLimits,
        timeout_s: float,
        cancel_after_chunks: int = 3,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.limits = limits
        self.timeout_s = timeout_s
        self.cancel_after_chunks = cancel_after_chunks
        self.headers = headers or {}
        self.targets: dict[str, HTTPTarget] = {}

    async def __aenter__(self) -> "SoakClient":
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers=self.headers,
        )
        for kind, cls in GENERATIONS.items():
            target = cls(self.url, self.model_name, temperature=1.0, ignore_eos=True, timeout_s=self.timeout_s)
            target.session = self.session
            self.targets[kind] = target
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()

    async def send(self, kind: str, request: BenchRequest, index: int, sent_at: float) -> Outcome:
        """Send one request of `kind`; every failure ends in the outcome, never raised."""
        if kind in GENERATIONS:
            return generation_outcome(kind, await self.targets[kind].send(request), sent_at)
        started = time.perf_counter()
        try:
            if kind == "cancelled_stream":
                outcome, status, detail = await self._cancelled_stream(request, index)
            elif kind == "invalid_body":
                outcome, status, detail = await self._refused(*self._invalid_body(index), expected=(400, 422))
            else:
                outcome, status, detail = await self._refused(*self._over_limit(request, index), expected=(413, 422))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            outcome, status, detail = "lost", 0, f"{type(exc).__name__}: {exc}"
        return Outcome(kind, outcome, status, detail, sent_at, time.perf_counter() - started)

    async def _cancelled_stream(self, request: BenchRequest, index: int) -> tuple[str, int, str]:
        """A stream on one of three APIs, closed after a few chunks; `ok` if it finished first."""
        path, body = [
            ("/predict", {"prompt": request.prompt}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": request.prompt}]}),
            ("/generate_stream", {"inputs": request.prompt}),
        ][index % 3]
        if path == "/generate_stream":
            body["parameters"] = {"max_new_tokens": request.max_tokens, "do_sample": True}
        else:
            body.update(max_tokens=request.max_tokens, stream=True, ignore_eos=True, model=self.model_name)
            if path == "/predict":
                del body["model"]
        async with self.session.post(self.url + path, json=body) as response:
            if response.status != 200:
                return "unexpected", response.status, (await response.text())[:300]
            chunks = 0
            async for data, _ in response.content.iter_chunks():
                chunks += bool(data)
                if chunks >= self.cancel_after_chunks:
                    # Closing drops the connection: the server sees its client go away mid-stream.
                    response.close()
                    return "cancelled", 200, f"{path} closed after {chunks} chunks"
        return "ok", 200, f"{path} finished within {chunks} chunks"

    def _invalid_body(self, index: int) -> tuple[str, bytes]:
        """Malformed JSON, a wrong type, a value out of range: 400 or 422 on every API."""
        return [
            ("/predict", b'{"prompt": "unclosed'),
            ("/v1/completions", json.dumps({"prompt": 5, "model": self.model_name}).encode()),
            ("/v1/chat/completions", json.dumps({"messages": "hi", "model": self.model_name}).encode()),
            ("/generate_stream", json.dumps({"inputs": "x", "parameters": {"temperature": "hot"}}).encode()),
            ("/predict", json.dumps({"prompt": "x", "top_p": 7.0}).encode()),
        ][index % 5]

    def _over_limit(self, request: BenchRequest, index: int) -> tuple[str, bytes]:
        """A body over --max-body-bytes (413), too many new tokens or stop sequences (422)."""
        limits = self.limits
        if index % 3 == 0:
            return "/predict", json.dumps({"prompt": "a" * (limits.max_body_bytes + 1024)}).encode()
        if index % 3 == 1:
            body = {"prompt": request.prompt, "max_tokens": limits.max_total_tokens, "model": self.model_name}
            return "/v1/completions", json.dumps(body).encode()
        stops = [f"stop{i}" for i in range(limits.max_stop_sequences + 1)]
        return "/predict", json.dumps({"prompt": request.prompt, "stop": stops}).encode()

    async def _refused(self, path: str, data: bytes, expected: tuple[int, ...]) -> tuple[str, int, str]:
        """`refused` when the answer is one of `expected` with a JSON error body, else `unexpected`."""
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.url + path, data=data, headers=headers) as response:
            text = await response.text()
        try:
            has_error = "error" in json.loads(text)
        except ValueError:
            has_error = False
        outcome = "refused" if response.status in expected and has_error else "unexpected"
        return outcome, response.status, f"{path}: {text[:200]}"
