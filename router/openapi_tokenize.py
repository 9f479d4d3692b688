"""The OpenAPI schemas of /tokenize (TGI's body or vLLM's), TGI's /chat_tokenize answer, and vLLM's /detokenize
and /tokenizer_info (router/api_tokenize.py)."""

from mixserve.router.openapi_builders import Schema, array, obj, ref, typed
from mixserve.router.openapi_openai import TOOL_CHOICE

TOKENIZE_REQUEST = obj(
    {
        "inputs": typed("string", "TGI's body: text to tokenize (BOS is added); TGI's answer", minLength=1),
        "prompt": typed("string", "text to tokenize (with prompt, not messages)", minLength=1),
        "add_special_tokens": typed("boolean", "add the tokenizer's special tokens (default: true for a prompt, "
                                    "false for messages, whose template writes its own)"),
        "messages": array({"type": "object"}, "a chat, rendered as /v1/chat/completions renders it", minItems=1),
        "add_generation_prompt": typed("boolean", "with messages: open a new assistant turn", default=True),
        "continue_final_message": typed("boolean", "with messages: leave the last message open", default=False),
        "chat_template_kwargs": {"type": "object", "description": "with messages: more template variables"},
        "tools": array(ref("Tool"), "with messages: the chat request's functions, in its prompt as it has them"),
        "tool_choice": TOOL_CHOICE,
        "return_token_strs": typed("boolean", "also return each token's string", default=False),
    },
    description="TGI's body (inputs) or vLLM's (prompt or messages, and their options)",
)  # fmt: skip

TOKENIZE_SCHEMAS: dict[str, Schema] = {
    "TokenizeRequest": TOKENIZE_REQUEST,
    "VllmTokenizeResponse": obj(
        {
            "count": typed("integer", "number of tokens"),
            "max_model_len": typed("integer", "--max-total-tokens"),
            "tokens": array({"type": "integer"}, "token ids"),
            "token_strs": {"type": ["array", "null"], "items": {"type": "string"}, "description": "when asked"},
        }
    ),
    "ChatTokenizeResponse": obj(
        {
            "tokenize_response": array(ref("SimpleToken"), "the prompt's tokens, each with its span in templated_text"),
            "templated_text": typed("string", "the prompt the chat request gets: its messages (and tools) templated"),
        }
    ),
    "DetokenizeRequest": obj(
        {"tokens": array({"type": "integer", "minimum": 0}, "token ids, below the vocabulary size", minItems=1)},
        ("tokens",),
    ),
    "DetokenizeResponse": obj({"prompt": typed("string", "the tokens' text, special tokens included")}),
    "TokenizerInfo": obj(
        {
            "tokenizer_class": typed("string", "the tokenizer's class"),
            **{
                name: {"type": ["string", "null"], "description": f"the tokenizer's {name.replace('_', ' ')}"}
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            },
            "chat_template": {"type": ["string", "null"], "description": "the chat template (Jinja)"},
            "vocab_size": typed("integer", "tokens the tokenizer knows"),
            "model_max_length": typed("integer", "--max-total-tokens"),
        }
    ),
}
