"""`GET /openapi.json` (OpenAPI 3.1) and `GET /docs` (the same spec as one self-contained HTML page).

Operations are described here, keyed by method and route template; the spec lists the routes the
app actually serves (so a flag that adds or removes a route changes the spec with it). A route
without a description here is missing from the spec, which the tests catch. HEAD is answered for
every GET and not listed separately. Bounds and defaults come from the modules that enforce them.
"""

import copy
import html
import json
from typing import Any

from aiohttp import web

from mixserve.router import openai_requests as oai
from mixserve.router.http_common import CONFIG
from mixserve.router.openapi_builders import STREAMED, Schema, array, obj, ref, typed
from mixserve.router.openapi_info import INFO
from mixserve.router.openapi_schemas import SCHEMAS
from mixserve.router.params import RequestLimits


def _json(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _sse(schema: Schema) -> dict[str, Any]:
    return {"description": STREAMED, "content": {"text/event-stream": {"schema": schema}}}


def _errors(schema: str = "Error") -> dict[str, Any]:
    codes = {
        "400": "malformed JSON or a field of the wrong type",
        "401": "missing or invalid API key",
        "408": "body not sent within --read-timeout",
        "413": "body too large",
        "422": "a value out of range, or unsupported",
        "429": "too many requests in flight",
        "503": "shards unavailable",
        "504": "past --request-timeout (a stream that has started ends with an error event instead)",
    }
    return {code: _json(ref(schema), why) for code, why in codes.items()}


MODEL_NOT_FOUND = {"404": _json(ref("OpenAIError"), "`model` names a model this server does not serve")}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": ref(schema)}}}


def _op(tag: str, summary: str, responses: dict[str, Any], body: str | None = None, **extra: Any) -> dict[str, Any]:
    operation = {"tags": [tag], "summary": summary, "responses": responses, **extra}
    if body is not None:
        operation["requestBody"] = _body(body)
    return operation


def _both(json_schema: str | Schema, sse_schema: str) -> dict[str, Any]:
    schema = ref(json_schema) if isinstance(json_schema, str) else json_schema
    ok = _json(schema, "JSON when stream is false; " + STREAMED + " when true")
    ok["content"]["text/event-stream"] = {"schema": ref(sse_schema)}
    return ok


def _predict_ok() -> dict[str, Any]:
    ok = _json(ref("PredictResponse"), "the text as chunked text/plain deltas; JSON when stream is false")
    ok["content"]["text/plain"] = {"schema": {"type": "string"}}
    return ok


def _invocations_ok() -> dict[str, Any]:
    ok = _json(
        {"type": ["object", "array"]}, "the answer of the route the body's keys name; " + STREAMED + " with stream"
    )
    ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    return ok


OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/predict"): _op(
        "mixserve",
        "Generate from a prompt or a chat",
        {"200": _predict_ok()} | _errors(),
        "PredictRequest",
    ),
    ("GET", "/health"): _op(
        "operations",
        "200 when every shard answers, or (several shard groups) while one group serves",
        {
            "200": _json(
                obj(
                    {
                        "status": {"enum": ["ok", "degraded"]},
                        "groups_down": array(
                            obj({"group": typed("integer", "group index"), "error": typed("string", "why it is down")}),
                            "only when degraded",
                        ),
                    }
                )
            ),
            "503": _json(ref("Error"), "shards unavailable"),
        },
    ),
    ("GET", "/info"): _op("operations", "Model, limits and live counters", {"200": _json(ref("Info"))}),
    ("GET", "/metrics"): _op(
        "operations",
        "Prometheus metrics",
        {
            "200": {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    ),
    ("POST", "/v1/chat/completions"): _op(
        "openai",
        "Chat completion",
        {"200": _both("ChatCompletion", "ChatCompletionChunk")} | _errors("OpenAIError") | MODEL_NOT_FOUND,
        "ChatCompletionRequest",
    ),
    ("POST", "/v1/responses"): _op(
        "openai",
        "Responses API: text or function calls",
        {"200": _both("Response", "ResponseStreamEvent")} | _errors("OpenAIError") | MODEL_NOT_FOUND,
        "ResponsesRequest",
    ),
    ("POST", "/v1/completions"): _op(
        "openai",
        "Text completion",
        {"200": _both("Completion", "Completion")} | _errors("OpenAIError") | MODEL_NOT_FOUND,
        "CompletionRequest",
    ),
    ("GET", "/v1/models"): _op("openai", "The served model", {"200": _json(ref("ModelList"))}),
    ("GET", "/v1/models/{model}"): _op(
        "openai",
        "One model",
        {"200": _json(ref("Model")), "404": _json(ref("OpenAIError"), "not the served model")},
        parameters=[{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
    ),
    ("POST", "/generate"): _op(
        "tgi", "Generate (TGI)", {"200": _json(ref("GenerateResponse"))} | _errors(), "GenerateRequest"
    ),
    ("POST", "/generate_stream"): _op(
        "tgi", "Generate, streaming tokens (TGI)", {"200": _sse(ref("StreamResponse"))} | _errors(), "GenerateRequest"
    ),
    ("POST", "/"): _op(
        "tgi",
        "TGI's compat route: /generate (inside a JSON array) or /generate_stream, by `stream`",
        {"200": _both(array(ref("GenerateResponse"), "one answer"), "StreamResponse")} | _errors(),
        "CompatGenerateRequest",
    ),
    ("POST", "/tokenize"): _op(
        "tgi",
        "Tokenize: TGI's answer for `inputs`, vLLM's for `prompt` or `messages`",
        {"200": _json({"oneOf": [array(ref("SimpleToken")), ref("VllmTokenizeResponse")]})} | _errors(),
        "TokenizeRequest",
    ),
    ("POST", "/chat_tokenize"): _op(
        "tgi",
        "A chat completions body's prompt, templated and tokenized (TGI)",
        {"200": _json(ref("ChatTokenizeResponse"))} | _errors(),
        "ChatCompletionRequest",
    ),
    ("POST", "/detokenize"): _op(
        "openai", "Detokenize (vLLM)", {"200": _json(ref("DetokenizeResponse"))} | _errors(), "DetokenizeRequest"
    ),
    ("GET", "/tokenizer_info"): _op(
        "openai", "The tokenizer's special tokens and chat template (vLLM)", {"200": _json(ref("TokenizerInfo"))}
    ),
    ("GET", "/version"): _op(
        "operations", "The server's version (vLLM)", {"200": _json(obj({"version": typed("string", "mixserve's")}))}
    ),
    ("GET", "/ping"): _op(
        "sagemaker",
        "SageMaker's health probe: /health's answer, without the API key",
        {"200": _json({"type": "object"}, "as /health"), "503": _json(ref("Error"), "shards unavailable")},
    ),
    ("POST", "/invocations"): _op(
        "sagemaker",
        "SageMaker's route: a chat completion (messages), a completion (prompt) or TGI's POST / (inputs)",
        {"200": _invocations_ok()} | _errors("InvocationsError"),
        "InvocationsRequest",
    ),
    ("GET", "/openapi.json"): _op("operations", "This spec", {"200": _json({"type": "object"})}),
    ("GET", "/docs"): _op(
        "operations", "This spec as HTML", {"200": {"description": "HTML", "content": {"text/html": {}}}}
    ),
}


def routes(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, route template) the app serves, HEAD left out (it mirrors GET)."""
    found = []
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None:
            found.append((route.method, route.resource.canonical))
    return found


def _with_limits(limits: RequestLimits) -> dict[str, Schema]:
    """SCHEMAS with the bounds this server's flags set: stop strings, alternatives per token, choices."""
    schemas = copy.deepcopy({**SCHEMAS, "Info": INFO})
    predict, chat, completion, tgi_parameters = (
        schemas[name]["properties"]
        for name in ("PredictRequest", "ChatCompletionRequest", "CompletionRequest", "GenerateParameters")
    )
    stops = [predict["stop"]["oneOf"][1], chat["stop"]["oneOf"][1], completion["stop"]["oneOf"][1]]
    for stop in [*stops, tgi_parameters["stop"]]:
        stop["maxItems"] = limits.max_stop_sequences
    if limits.max_stop_sequences == 0:
        # Even one stop string is refused, so the single-string spelling is too.
        for body in (predict, chat, completion):
            body["stop"] = {"type": "null", "description": "stop sequences are off (--max-stop-sequences 0)"}
    tgi_parameters["top_n_tokens"]["maximum"] = limits.max_top_n_tokens
    tgi_parameters["best_of"]["maximum"] = limits.max_best_of
    chat["top_logprobs"]["maximum"] = min(oai.MAX_CHAT_TOP_LOGPROBS, limits.max_top_n_tokens)
    completion["logprobs"]["maximum"] = min(oai.MAX_COMPLETION_LOGPROBS, limits.max_top_n_tokens)
    for body in (chat, completion):
        body["n"]["maximum"] = min(oai.MAX_CHOICES, limits.max_choices)
    return schemas


def build_spec(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes."""
    config = app[CONFIG]
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes(app):
        operation = OPERATIONS.get((method, path))
        if operation is not None:
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mixserve",
            "version": config.version or "0",
            "description": f"Serving {config.model_id}. Every route but /health needs the API key when one is set.",
        },
        "paths": paths,
        "components": {
            "schemas": _with_limits(config.limits),
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}, {}],
    }


_BOUNDS = ("default", "minimum", "exclusiveMinimum", "maximum", "minLength", "minItems", "maxItems", "enum")


def _schema_rows(schema: Schema, schemas: dict[str, Schema]) -> str:
    if "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    rows = []
    for name, field in schema.get("properties", {}).items():
        either = "oneOf" in field or "anyOf" in field
        kind = field.get("type") or ("one of" if either else field.get("$ref", "").rsplit("/", 1)[-1])
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        bounds = ", ".join(f"{key} {json.dumps(field[key])}" for key in _BOUNDS if key in field)
        cells = (name, str(kind), bounds, field.get("description", ""))
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    return "<table><tr><th>field</th><th>type</th><th>bounds</th><th>meaning</th></tr>" + "".join(rows) + "</table>"


def render_docs(spec: dict[str, Any]) -> str:
    """The spec as one HTML page that loads nothing else: every route, its body fields and responses."""
    parts = [f"<h1>{html.escape(spec['info']['title'])} {html.escape(spec['info']['version'])}</h1>"]
    description = html.escape(spec["info"]["description"])
    parts.append(f"<p>{description} Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>")
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            parts.append(
                f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p>{html.escape(op['summary'])}</p>"
            )
            if "requestBody" in op:
                body = op["requestBody"]["content"]["application/json"]["schema"]
                parts.append(_schema_rows(body, spec["components"]["schemas"]))
            answers = ", ".join(f"{code}: {r['description']}" for code, r in op["responses"].items())
            parts.append(f"<p>Responses: {html.escape(answers)}</p>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;padding:2px 6px}"
    head = f"<meta charset='utf-8'><title>mixserve API</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"


async def openapi_json(request: web.Request) -> web.Response:
    """`GET /openapi.json`."""
    return web.json_response(build_spec(request.app))


async def docs(request: web.Request) -> web.Response:
    """`GET /docs`."""
    return web.Response(text=render_docs(build_spec(request.app)), content_type="text/html")


def add_routes(app: web.Application) -> None:
    """Register `/openapi.json` and `/docs` on `app`."""
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
