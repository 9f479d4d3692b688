"""The soak's own request kinds beyond the load generator's targets (`benchmarks.targets`): answers
read whole (`stream: false`), chat, and the features a batch mixes: JSON-schema output, forced tool
calls, predicted outputs, several choices with logprobs. Each reads its answer and raises `WrongAnswer`
where it is not what the request asked for (a soak's `unexpected`).
"""

import json
import time
from typing import Any

import aiohttp

from mixserve.benchmarks.metrics import RequestRecord
from mixserve.benchmarks.targets import HTTPTarget, OpenAICompletionsTarget, StreamError
from mixserve.benchmarks.workload import BenchRequest

# The JSON-schema kind's schema, and the forced tool's parameters: short enough to end within FEATURE_TOKENS.
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["city", "count"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
FEATURE_TOKENS = 64
CHOICES = 2
TOP_LOGPROBS = 2


class WrongAnswer(StreamError):
    """A whole answer, but not what the request asked for."""


class PredictJSONTarget(HTTPTarget):
    """`POST /predict` with `stream: false`: one JSON body with the text and the token counts."""

    name = "predict_json"
    path = "/predict"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": self.temperature}
        return {**body, "stream": False, "ignore_eos": self.ignore_eos}

    async def read(self, response: aiohttp.ClientResponse, record: RequestRecord, sent: float) -> None:
        answer = await response.json(content_type=None)
        if not isinstance(answer.get("output"), str) or "finish_reason" not in answer:
            raise StreamError(f"no output/finish_reason in {str(answer)[:200]}")
        record.token_times.append(time.perf_counter() - sent)
        record.output_tokens, record.count_method = answer["generated_tokens"], "generated_tokens"


class CompletionsJSONTarget(OpenAICompletionsTarget):
    """OpenAI `POST /v1/completions` with `stream: false`."""

    name = "completions_json"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body = super().body(request)
        del body["stream_options"]
        return {**body, "stream": False}

    async def read(self, response: aiohttp.ClientResponse, record: RequestRecord, sent: float) -> None:
        answer = await response.json(content_type=None)
        if not answer.get("choices") or "usage" not in answer:
            raise StreamError(f"no choices/usage in {str(answer)[:200]}")
        self.check(answer)
        choice = answer["choices"][0]
        record.text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
        record.finish_reason = choice.get("finish_reason") or ""
        record.token_times.append(time.perf_counter() - sent)
        record.output_tokens, record.count_method = answer["usage"]["completion_tokens"], "usage"

    def check(self, answer: dict[str, Any]) -> None:
        """Raise WrongAnswer where `answer` is not what the request asked for (any answer will do here)."""


class ChatStreamTarget(OpenAICompletionsTarget):
    """OpenAI `POST /v1/chat/completions`, streamed: the prompt as one user message."""

    name = "chat_stream"
    path = "/v1/chat/completions"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        return _as_chat(super().body(request))


class ChatJSONTarget(CompletionsJSONTarget):
    """OpenAI `POST /v1/chat/completions` with `stream: false`."""

    name = "chat_json"
    path = "/v1/chat/completions"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        return _as_chat(super().body(request))


class ChatSchemaTarget(ChatJSONTarget):
    """Chat with `response_format` a JSON schema, sampled: a finished answer parses and follows it."""

    name = "chat_schema"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body = {**super().body(request), "max_tokens": FEATURE_TOKENS}
        body.pop("ignore_eos", None)  # a finished grammar allows only EOS
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "soak", "schema": SCHEMA}}
        return body

    def check(self, answer: dict[str, Any]) -> None:
        choice = answer["choices"][0]
        if choice["finish_reason"] == "stop":
            _follows_schema(_parsed(choice["message"]["content"]))


class ChatToolsTarget(ChatJSONTarget):
    """Chat with one tool and `tool_choice: required`: the answer is a call of it, its arguments valid."""

    name = "chat_tools"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body = {**super().body(request), "max_tokens": FEATURE_TOKENS, "tools": [TOOL], "tool_choice": "required"}
        body.pop("ignore_eos", None)
        return {**body, "parallel_tool_calls": False}

    def check(self, answer: dict[str, Any]) -> None:
        choice = answer["choices"][0]
        if choice["finish_reason"] == "length":
            return
        [call] = choice["message"].get("tool_calls") or [None]
        if choice["finish_reason"] != "tool_calls" or call is None or call["function"]["name"] != "get_weather":
            raise WrongAnswer(f"not a call of get_weather: {str(choice)[:200]}")
        _follows_schema(_parsed(call["function"]["arguments"]))


class PredictionTarget(CompletionsJSONTarget):
    """Greedy completions; a prompt's first answer is kept, and later ones send it, its middle third
    replaced, as their predicted output: they must answer the same text, whatever else the batch holds."""

    name = "completions_prediction"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first: dict[str, str] = {}  # prompt -> its greedy answer

    async def send(self, request: BenchRequest) -> RequestRecord:
        body = {**self.body(request), "temperature": 0, "ignore_eos": True}
        first = self.first.get(request.prompt)
        if first is not None:
            third = len(first) // 3
            edited = first[:third] + " an edit the output will not follow " + first[2 * third :]
            body["prediction"] = {"type": "content", "content": edited}
        record = await self.post(request, body)
        if record.ok and first is None:
            self.first.setdefault(request.prompt, record.text)
        elif record.ok and record.text != first:
            record.ok = False
            record.error = f"WrongAnswer: with a prediction {record.text[:80]!r}, without {first[:80]!r}"
        return record


class ChoicesLogprobsTarget(CompletionsJSONTarget):
    """Completions with n > 1, a seed and logprobs: every choice, and one logprob per token of each."""

    name = "completions_logprobs"

    def body(self, request: BenchRequest) -> dict[str, Any]:
        seed = len(request.prompt) * 7919 + request.max_tokens
        return {**super().body(request), "n": CHOICES, "logprobs": TOP_LOGPROBS, "seed": seed}

    def check(self, answer: dict[str, Any]) -> None:
        choices = answer["choices"]
        if sorted(c["index"] for c in choices) != list(range(CHOICES)):
            raise WrongAnswer(f"choices {[c['index'] for c in choices]}, asked for {CHOICES}")
        tokens = [len(c["logprobs"]["tokens"]) for c in choices]
        if sum(tokens) != answer["usage"]["completion_tokens"]:
            raise WrongAnswer(f"logprobs of {tokens} tokens, usage says {answer['usage']['completion_tokens']}")
        for choice in choices:
            if any(len(top) > TOP_LOGPROBS + 1 for top in choice["logprobs"]["top_logprobs"]):
                raise WrongAnswer("more alternatives than asked for (and the sampled token)")


def _as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A completions body as the chat body asking the same: its prompt as one user message."""
    prompt = body.pop("prompt")
    return {**body, "messages": [{"role": "user", "content": prompt}]}


def _parsed(text: object) -> object:
    """`text` as JSON; a WrongAnswer (not a lost request) where it is none."""
    try:
        return json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WrongAnswer(f"not JSON: {str(text)[:200]!r}") from None


def _follows_schema(value: object) -> None:
    """SCHEMA's checks, by hand (the harness takes no JSON-schema validator)."""
    if not isinstance(value, dict) or set(value) != {"city", "count"}:
        raise WrongAnswer(f"not an object of city and count: {value!r}")
    city, count = value["city"], value["count"]
    if not isinstance(city, str) or len(city) > 12 or type(count) is not int or not 0 <= count <= 999:
        raise WrongAnswer(f"outside the schema: {value!r}")
