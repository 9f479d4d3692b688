"""OpenAI's request bodies parsed: `/v1/chat/completions` and `/v1/completions` bodies (with vLLM's
extensions, router/openai_vllm.py) validated into an `OpenAIRequest`: the prompts, the sampling
parameters and what the response reports. Within OpenAI's bounds and the server's limits; a bad field is
a ValidationError naming it. The routes are router/api_openai.py (and router/api_responses.py, which
reads a Responses body as a chat one).
"""

from dataclasses import dataclass, replace
from typing import Any

from mixserve.router.errors import BadRequest, ValidationError
from mixserve.router.fields import (
    MAX_SEED,
    as_bool,
    as_float,
    as_int,
    as_logit_bias,
    as_messages,
    as_stop,
    max_new_tokens_from,
)
from mixserve.router.openai_vllm import (
    completion_prompts,
    output_fields,
    prompt_logprobs,
    refuse_unsupported,
    sampling_fields,
    template_options,
    truncate_prompt_tokens,
    unsupported,
)
from mixserve.router.params import (
    DEFAULT_LIMITS,
    MAX_ABS_PENALTY,
    MAX_TOP_K,
    GenerationParams,
    GenerationRequest,
    RequestLimits,
)
from mixserve.router.prediction import parse_prediction
from mixserve.router.structured import openai_spec
from mixserve.router.tool_turns import fit_to_template, parse_tool_turns
from mixserve.router.tools import ToolPlan, parse_tools

# OpenAI's bounds.
MAX_CHOICES = 128
MAX_TEMPERATURE = 2.0
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# OpenAI's documented default for /v1/completions; chat completions default to what fits the context.
COMPLETIONS_MAX_TOKENS = 16


@dataclass(slots=True)
class OpenAIRequest:
    """A validated chat or completions body: the prompts, how to sample, and what to report."""

    prompts: list[GenerationRequest]  # chat: one conversation; completions: one per prompt string
    params: GenerationParams  # max_new_tokens is set per prompt at submission
    max_tokens: int | None  # None: the API's default
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; else the alternatives per token
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's continuous_usage_stats: every chunk carries the usage so far
    echo: bool = False  # completions: the prompt (and with logprobs, its tokens' logprobs) before the completion
    truncate_prompt_tokens: int | None = None  # keep each prompt's last N tokens (-1: --max-input-tokens)
    score_only: bool = False  # completions: echo with max_tokens 0, the prompt scored and nothing generated
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' logprobs, with this many alternatives
    tools: ToolPlan | None = None  # chat: the tools offered and how the model must call them
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N"
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids beside the text
    request_id: str | None = None  # vLLM's: the response's id (after its prefix) instead of a random one


def _sampling(
    body: dict[str, Any], *, max_tokens: int | None, top_n_tokens: int, limits: RequestLimits
) -> GenerationParams:
    """The sampling fields every OpenAI body shares, with OpenAI's defaults."""
    stream = as_bool("stream", body.get("stream"), default=False)
    if body.get("stream_options") is not None and not stream:
        raise ValidationError("stream_options is only allowed with stream: true")
    min_tokens = as_int("min_tokens", body.get("min_tokens"), default=0, ge=0)
    ignore_eos = as_bool("ignore_eos", body.get("ignore_eos"), default=False)
    if min_tokens:
        # Only the case the engine can honour: every token up to the limit (EOS ignored).
        if min_tokens != max_tokens:
            raise ValidationError(
                f"min_tokens must be 0 or equal to max_tokens ({max_tokens}), got {min_tokens}; "
                "a lower bound below the limit is not supported (use ignore_eos)"
            )
        ignore_eos = True
    seed = body.get("seed")
    refuse_unsupported(body)
    return GenerationParams(
        temperature=as_float("temperature", body.get("temperature"), default=1.0, ge=0, le=MAX_TEMPERATURE),
        top_p=as_float("top_p", body.get("top_p"), default=1.0, gt=0, le=1),
        # vLLM's spelling of "off" is -1.
        top_k=max(0, as_int("top_k", body.get("top_k"), default=0, ge=-1, le=MAX_TOP_K)),
        repetition_penalty=as_float("repetition_penalty", body.get("repetition_penalty"), default=1.0, gt=0),
        frequency_penalty=as_float(
            "frequency_penalty", body.get("frequency_penalty"), default=0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY
        ),
        presence_penalty=as_float(
            "presence_penalty", body.get("presence_penalty"), default=0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY
        ),
        stop=as_stop("stop", body.get("stop"), max_count=limits.max_stop_sequences),
        # OpenAI's seed is a signed 64-bit integer; the shards take its two's-complement bits.
        seed=None if seed is None else as_int("seed", seed, ge=-(2**63), le=MAX_SEED) % (MAX_SEED + 1),
        stream=stream,
        ignore_eos=ignore_eos,
        top_n_tokens=top_n_tokens,
        grammar=openai_spec(body),
        logit_bias=as_logit_bias("logit_bias", body.get("logit_bias")),
        prediction=parse_prediction(body.get("prediction")),
        **sampling_fields(body),
    )


def _usage_options(body: dict[str, Any]) -> dict[str, bool]:
    """stream_options as OpenAIRequest keywords: include_usage (a last chunk with the usage), and vLLM's
    continuous_usage_stats (with it, every chunk carries the usage so far)."""
    options = body.get("stream_options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    include = as_bool("stream_options.include_usage", options.get("include_usage"), default=False)
    continuous = as_bool("stream_options.continuous_usage_stats", options.get("continuous_usage_stats"), default=False)
    return {"include_usage": include, "continuous_usage": include and continuous}


def _text_content(i: int, message: object) -> object:
    """A message with its content as one string: text parts joined by newlines (as vLLM does)."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValidationError(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content[{j}].text must be a string")
            texts.append(part["text"])
        content = "\n".join(texts)
    # OpenAI's "developer" role is the system prompt under its newer name.
    role = "system" if message.get("role") == "developer" else message.get("role")
    # An assistant's calls and a tool message's call id (router/tools.py checks them); other roles have neither.
    tool_part = {"assistant": "tool_calls", "tool": "tool_call_id"}.get(role) if isinstance(role, str) else None
    tool_parts = {tool_part: message[tool_part]} if tool_part in message else {}
    return {"role": role, "content": content, **tool_parts}


def chat_messages(messages: object) -> list[dict[str, Any]]:
    """The chat messages, checked: text content, and the tool parts (router/tools.py) kept where given."""
    if not isinstance(messages, list):
        return as_messages("messages", messages)
    turns = parse_tool_turns([_text_content(i, m) for i, m in enumerate(messages)])
    extras = [
        {k: v for k, v in m.items() if k not in ("role", "content")} if isinstance(m, dict) else {} for m in turns
    ]
    checked = as_messages(
        "messages",
        [{"role": m["role"], "content": m["content"]} if e else m for m, e in zip(turns, extras, strict=True)],
    )
    return [{**m, **e} for m, e in zip(checked, extras, strict=True)]


def _max_choices(limits: RequestLimits) -> int:
    return min(MAX_CHOICES, limits.max_choices)


def parse_chat_request(body: dict[str, Any], limits: RequestLimits = DEFAULT_LIMITS) -> OpenAIRequest:
    """Validate a `/v1/chat/completions` body within `limits`."""
    unsupported(body, "functions", "the legacy functions field is replaced by tools")
    unsupported(body, "echo", "a chat answer does not repeat the last message")
    unsupported(body, "add_special_tokens", "the chat template adds the special tokens")
    unsupported(body, "audio", "the model writes text only")
    unsupported(body, "modalities", 'the model writes text only: ["text"]', ["text"])
    if body.get("web_search_options") is not None:  # {} asks for a search with its defaults
        raise ValidationError("web_search_options is not supported: the server has no web search")
    tools = parse_tools(body)
    messages = chat_messages(body.get("messages"))
    options = template_options(body)
    max_tokens = max_new_tokens_from(body, ("max_completion_tokens", "max_tokens"), default=0) or None
    logprobs = as_bool("logprobs", body.get("logprobs"), default=False)
    top_logprobs = as_int(
        "top_logprobs",
        body.get("top_logprobs"),
        default=0,
        ge=0,
        le=min(MAX_CHAT_TOP_LOGPROBS, limits.max_top_n_tokens),
    )
    if top_logprobs and not logprobs:
        raise ValidationError("top_logprobs needs logprobs: true")
    params = _sampling(body, max_tokens=max_tokens, top_n_tokens=top_logprobs, limits=limits)
    params, prompt_n = prompt_logprobs(body, params, min(MAX_CHAT_TOP_LOGPROBS, limits.max_top_n_tokens))
    return OpenAIRequest(
        prompts=[GenerationRequest(prompt=None, messages=messages, params=params, template_options=options)],
        params=params,
        max_tokens=max_tokens,
        n=as_int("n", body.get("n"), default=1, ge=1, le=_max_choices(limits)),
        logprobs=top_logprobs if logprobs else None,
        tools=tools,
        truncate_prompt_tokens=truncate_prompt_tokens(body),
        prompt_logprobs=prompt_n,
        **_usage_options(body),
        **output_fields(body),
    )


async def prepare_tools(parsed: OpenAIRequest, tokenizer) -> None:
    """Fit a chat request's tools and tool turns to the model's chat template (router/tools.py)."""
    await fit_to_template(parsed.tools, parsed.prompts[0], parsed.params, tokenizer)


def parse_completion_request(body: dict[str, Any], limits: RequestLimits = DEFAULT_LIMITS) -> OpenAIRequest:
    """Validate a `/v1/completions` body within `limits`: `prompt` is a string, an array of strings, an array
    of token ids or an array of such arrays (as OpenAI and vLLM take it; token ids get no BOS added)."""
    unsupported(body, "suffix", "no insertion mode")
    prompts = completion_prompts(body.get("prompt"))
    # vLLM's: a string prompt gets the tokenizer's special tokens (BOS) unless false.
    special = as_bool("add_special_tokens", body.get("add_special_tokens"), default=True)
    echo = as_bool("echo", body.get("echo"), default=False)
    # OpenAI's scoring request: echo with max_tokens 0 answers the prompt (with its logprobs) and no
    # completion; the engine still runs each prompt for one token, which is not reported.
    score_only = echo and body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool)
    if score_only and as_bool("stream", body.get("stream"), default=False):
        raise ValidationError("max_tokens 0 (echo, the prompt scored alone) is answered without stream")
    max_tokens = 1 if score_only else max_new_tokens_from(body, ("max_tokens",), default=0) or None
    max_choices = _max_choices(limits)
    n = as_int("n", body.get("n"), default=1, ge=1, le=max_choices)
    best_of = as_int("best_of", body.get("best_of"), default=n, ge=1)
    if best_of != n:
        raise ValidationError(f"best_of must equal n ({n}) when given, got {best_of}; no choice is discarded")
    if n * len(prompts) > max_choices:
        raise ValidationError(f"n ({n}) x prompts ({len(prompts)}) must be <= {max_choices}")
    logprobs = body.get("logprobs")
    top = min(MAX_COMPLETION_LOGPROBS, limits.max_top_n_tokens)
    logprobs = None if logprobs is None else as_int("logprobs", logprobs, ge=0, le=top)
    params = _sampling(body, max_tokens=max_tokens, top_n_tokens=logprobs or 0, limits=limits)
    truncate = truncate_prompt_tokens(body)
    if echo and truncate is not None:
        raise ValidationError("echo cannot be combined with truncate_prompt_tokens: it would echo another prompt")
    if echo and logprobs is not None:
        params = replace(params, prompt_logprobs=True)
    params, prompt_n = prompt_logprobs(body, params, top)
    return OpenAIRequest(
        prompts=[
            GenerationRequest(prompt=None, messages=None, params=params, prompt_token_ids=p)
            if isinstance(p, list)
            else GenerationRequest(prompt=p, messages=None, params=params, add_special_tokens=special)
            for p in prompts
        ],
        params=params,
        max_tokens=max_tokens,
        n=n,
        logprobs=logprobs,
        echo=echo,
        truncate_prompt_tokens=truncate,
        score_only=score_only,
        prompt_logprobs=prompt_n,
        **_usage_options(body),
        **output_fields(body),
    )
