"""`POST /tokenize` in both dialects, TGI's `POST /chat_tokenize`, and vLLM's `POST /detokenize` and
`GET /tokenizer_info`.

TGI's body `{"inputs": str}` answers its tokens with their character spans (BOS included). vLLM's
`{"prompt": str}` (special tokens added unless `add_special_tokens` is false) or `{"messages": [...]}`
(rendered with the chat template as chat requests are: `add_generation_prompt`, `continue_final_message`,
`chat_template_kwargs`, and `tools` with the messages' tool turns fitted to the template as a chat
request's are, router/tool_turns.py, so the count is that request's prompt) answers
`{count, max_model_len, tokens, token_strs}`; `/detokenize` turns `{"tokens": [...]}` back into
`{"prompt": str}`; `/tokenizer_info` gives the special tokens and the chat template, which is what a
remote tokenizer (lm-evaluation-harness's) needs with those two. Which dialect a /tokenize body speaks is
its key: `inputs` or not. `/chat_tokenize` takes a chat completions body and answers TGI's
`{tokenize_response, templated_text}`: the prompt that request would get and its tokens with their spans.
"""

from typing import Any

from aiohttp import web

from mixserve.router.engine_api import EngineAPI
from mixserve.router.errors import BadRequest, ValidationError
from mixserve.router.fields import as_bool, as_prompt, as_token_ids
from mixserve.router.http_common import CONFIG, ENGINE, read_json
from mixserve.router.openai_requests import chat_messages, parse_chat_request, prepare_tools
from mixserve.router.openai_vllm import template_options
from mixserve.router.params import GenerationParams, GenerationRequest, render_prompt
from mixserve.router.tool_turns import fit_to_template
from mixserve.router.tools import parse_tools
from mixserve.router.validation import check_in_vocabulary


def _spans(engine: EngineAPI, text: str, add_special_tokens: bool) -> list[dict[str, Any]]:
    """TGI's tokens: each id with its text and its character span in `text` (a special token added: empty)."""
    encoded = engine.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return [
        {"id": token_id, "text": text[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]


# vLLM's /tokenize fields; a TGI body (inputs) takes none of them.
_VLLM_FIELDS = (
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "return_token_strs",
    "tools",
)


async def _vllm_tokens(engine: EngineAPI, body: dict[str, Any]) -> dict[str, Any]:
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise BadRequest("give inputs (TGI), or prompt or messages (vLLM)")
    # Every field is checked whichever form uses it, so a malformed one is never passed over.
    options = template_options(body)
    strings = as_bool("return_token_strs", body.get("return_token_strs"), default=False)
    tools = parse_tools(body)
    if body.get("prompt") is not None:
        if tools is not None:
            raise ValidationError("tools go with messages: a prompt is tokenized as it is")
        text = as_prompt("prompt", body["prompt"])
        special = as_bool("add_special_tokens", body.get("add_special_tokens"), default=True)
    else:
        request = GenerationRequest(
            prompt=None, messages=chat_messages(body["messages"]), params=GenerationParams(), template_options=options
        )
        await fit_to_template(tools, request, request.params, engine.tokenizer)
        text = render_prompt(engine.tokenizer, request)
        # The chat template writes its own special tokens; more only when asked.
        special = as_bool("add_special_tokens", body.get("add_special_tokens"), default=False)
    ids = engine.tokenizer(text, add_special_tokens=special)["input_ids"]
    return {
        "count": len(ids),
        "max_model_len": engine.stats().limits.max_total_tokens,
        "tokens": ids,
        "token_strs": engine.tokenizer.convert_ids_to_tokens(ids) if strings else None,
    }


async def tokenize_route(request: web.Request) -> web.Response:
    """`POST /tokenize`: TGI's answer for `inputs`, vLLM's for `prompt` or `messages`."""
    engine = request.app[ENGINE]
    body = await read_json(request)
    if "inputs" in body:
        mixed = [name for name in _VLLM_FIELDS if body.get(name) is not None]
        if mixed:
            raise ValidationError(f"inputs (TGI's body) cannot be combined with vLLM's {', '.join(mixed)}")
        return web.json_response(_spans(engine, as_prompt("inputs", body.get("inputs")), add_special_tokens=True))
    return web.json_response(await _vllm_tokens(engine, body))


async def chat_tokenize_route(request: web.Request) -> web.Response:
    """`POST /chat_tokenize` (TGI): a chat completions body's prompt, as that request gets it (its tools and
    tool turns fitted to the template), and its tokens with their spans."""
    engine = request.app[ENGINE]
    parsed = parse_chat_request(await read_json(request), request.app[CONFIG].limits)
    await prepare_tools(parsed, engine.tokenizer)
    text = render_prompt(engine.tokenizer, parsed.prompts[0])
    # The chat template writes the special tokens, as for the chat request (router/validation.py).
    return web.json_response(
        {"tokenize_response": _spans(engine, text, add_special_tokens=False), "templated_text": text}
    )


async def detokenize_route(request: web.Request) -> web.Response:
    """`POST /detokenize` (vLLM): the text of `tokens`, special tokens included."""
    engine = request.app[ENGINE]
    body = await read_json(request)
    ids = as_token_ids("tokens", body.get("tokens"))
    check_in_vocabulary(engine, "tokens", ids)
    return web.json_response({"prompt": engine.tokenizer.decode(ids)})


async def tokenizer_info_route(request: web.Request) -> web.Response:
    """`GET /tokenizer_info` (vLLM): the tokenizer's class, special tokens, chat template and sizes."""
    engine = request.app[ENGINE]
    tokenizer = engine.tokenizer
    return web.json_response(
        {
            "tokenizer_class": type(tokenizer).__name__,
            **{name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "chat_template": getattr(tokenizer, "chat_template", None),
            "vocab_size": len(tokenizer),
            "model_max_length": engine.stats().limits.max_total_tokens,
        }
    )


def add_routes(app: web.Application) -> None:
    """Register /tokenize, /detokenize and /tokenizer_info on `app` (built by `router.server.build_app`)."""
    app.router.add_post("/tokenize", tokenize_route)
    app.router.add_post("/chat_tokenize", chat_tokenize_route)
    app.router.add_post("/detokenize", detokenize_route)
    app.router.add_get("/tokenizer_info", tokenizer_info_route)
