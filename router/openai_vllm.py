"""vLLM's and OpenAI's extensions to the request bodies, parsed for router/openai_requests.py (and the chat
template options for /tokenize): vLLM's sampling and output fields, its chat template fields, prompt
truncation and prompt logprobs, the prompt's forms (strings or token ids), and the fields this server
refuses rather than ignore."""

from dataclasses import replace
from typing import Any

from mixserve.router.errors import BadRequest, ValidationError, json_type_name
from mixserve.router.fields import as_bad_words, as_bool, as_float, as_int, as_prompt, as_token_ids
from mixserve.router.params import MAX_PRIORITY, GenerationParams


def unsupported(body: dict[str, Any], name: str, why: str, default: object = None) -> None:
    """A 422 for a field this server does not implement, unless absent or at its off value (clients that
    send every field send those)."""
    value = body.get(name)
    if value not in (None, False, "", [], {}, default) and not (isinstance(value, (int, float)) and value == 0):
        raise ValidationError(f"{name} is not supported: {why}")


# Longest request_id taken (it becomes the response's id).
MAX_REQUEST_ID = 256

# vLLM's sampling fields this server does not implement, refused when set rather than ignored.
VLLM_UNSUPPORTED = (
    ("use_beam_search", "no beam search", None),
    ("length_penalty", "no beam search", 1),
    (
        "chat_template",
        "the model's own chat template is used (vLLM too refuses one sent with a request by default)",
        None,
    ),
    ("documents", "no document templates", None),
    ("structural_tag", "use response_format, guided_json or guided_grammar", None),
    ("guided_whitespace_pattern", "JSON output is compact", None),
    ("logits_processors", "no custom logits processors", None),
    ("mm_processor_kwargs", "text only", None),
    ("prompt_embeds", "prompts are text or token ids", None),
    ("kv_transfer_params", "no disaggregated prefill", None),
    ("vllm_xargs", "no custom logits processors", None),
)


def prompt_logprobs(body: dict[str, Any], params: GenerationParams, most: int) -> tuple[GenerationParams, int | None]:
    """vLLM's prompt_logprobs N: the prompt scored, with N alternatives a position (the engine's top_n_tokens
    raised to N where the output asked for fewer); not streamed."""
    value = body.get("prompt_logprobs")
    if value is None:
        return params, None
    n = as_int("prompt_logprobs", value, ge=0, le=most)
    if params.stream:
        raise ValidationError("prompt_logprobs is answered without stream")
    return replace(params, prompt_logprobs=True, top_n_tokens=max(params.top_n_tokens, n)), n


def truncate_prompt_tokens(body: dict[str, Any]) -> int | None:
    """vLLM's truncate_prompt_tokens: keep the prompt's last N tokens (-1: up to --max-input-tokens)."""
    value = as_int("truncate_prompt_tokens", body.get("truncate_prompt_tokens"), default=0, ge=-1)
    return None if value == 0 else value


def refuse_unsupported(body: dict[str, Any]) -> None:
    """A 422 for the first of vLLM's unimplemented fields the body sets."""
    for name, why, default in VLLM_UNSUPPORTED:
        unsupported(body, name, why, default)


def output_fields(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's output fields, as OpenAIRequest keywords: return_tokens_as_token_ids (logprobs name each token
    "token_id:N", its id, where its text may not say which token it was), return_token_ids (the prompt's and
    each choice's token ids beside the text) and request_id (the response's id)."""
    request_id = body.get("request_id")
    if request_id is not None and not (isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID):
        raise ValidationError(f"request_id must be a string of 1 to {MAX_REQUEST_ID} characters")
    return {
        "return_tokens_as_token_ids": as_bool(
            "return_tokens_as_token_ids", body.get("return_tokens_as_token_ids"), default=False
        ),
        "return_token_ids": as_bool("return_token_ids", body.get("return_token_ids"), default=False),
        "request_id": request_id,
    }


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's sampling and output fields, as GenerationParams keywords."""
    stop_token_ids, allowed = body.get("stop_token_ids"), body.get("allowed_token_ids")
    return {
        "stop_token_ids": [] if stop_token_ids in (None, []) else as_token_ids("stop_token_ids", stop_token_ids),
        "allowed_token_ids": [] if allowed is None else as_token_ids("allowed_token_ids", allowed),
        "bad_words": as_bad_words("bad_words", body.get("bad_words")),
        "cache_salt": None if body.get("cache_salt") is None else as_prompt("cache_salt", body.get("cache_salt")),
        "priority": as_int("priority", body.get("priority"), default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY),
        "min_p": as_float("min_p", body.get("min_p"), default=0.0, ge=0, le=1),
        "include_stop_str_in_output": as_bool(
            "include_stop_str_in_output", body.get("include_stop_str_in_output"), default=False
        ),
        "skip_special_tokens": as_bool("skip_special_tokens", body.get("skip_special_tokens"), default=True),
    }


# Keys of chat_template_kwargs that would override what the server passes the template itself.
_RESERVED_TEMPLATE_KEYS = frozenset({"conversation", "messages", "tools", "tokenize", "return_dict", "chat_template"})


def template_options(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's chat template fields: add_generation_prompt (default true), continue_final_message (the last
    message left open for the model to continue; not with add_generation_prompt) and chat_template_kwargs
    (more variables for the template)."""
    continue_final = as_bool("continue_final_message", body.get("continue_final_message"), default=False)
    add_prompt = as_bool("add_generation_prompt", body.get("add_generation_prompt"), default=not continue_final)
    if continue_final and add_prompt:
        raise ValidationError("continue_final_message cannot be combined with add_generation_prompt: true")
    extra = body.get("chat_template_kwargs")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise BadRequest(f"chat_template_kwargs must be an object, got {json_type_name(extra)}")
    reserved = sorted(_RESERVED_TEMPLATE_KEYS & set(extra))
    if reserved:
        raise ValidationError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    return {**extra, "add_generation_prompt": add_prompt, "continue_final_message": continue_final}


def completion_prompts(prompt: object) -> list[str | list[int]]:
    """`/v1/completions`' prompt as a list of prompts, each a string or a list of token ids."""
    if prompt is None:
        raise BadRequest("prompt is required: a string, an array of strings or an array of token ids")
    if not isinstance(prompt, list):
        return [as_prompt("prompt", prompt)]
    if not prompt:
        raise ValidationError("prompt must not be an empty array")
    if isinstance(prompt[0], int) and not isinstance(prompt[0], bool):
        return [as_token_ids("prompt", prompt)]
    if isinstance(prompt[0], list):
        return [as_token_ids(f"prompt[{i}]", p) for i, p in enumerate(prompt)]
    return [as_prompt(f"prompt[{i}]", p) for i, p in enumerate(prompt)]
