"""A generation request's parameters (`GenerationParams`, `GenerationRequest`), checked as they are
built, and the prompt rendered from them; the field validators every front parses its body with are
router/fields.py's. The bounds that flags set per request (`RequestLimits`: stop strings, alternatives
per token, choices) are passed to each API's parser, which checks them under its own field names.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2

from mixserve.router.errors import BadRequest, ValidationError, json_type_name
from mixserve.router.fields import (
    as_bad_words,
    as_bool,
    as_float,
    as_int,
    as_logit_bias,
    as_prompt,
    as_seed,
    as_stop,
    as_token_ids,
)
from mixserve.router.structured import GrammarSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Defaults of the per-request limit flags: TGI's for --max-stop-sequences and --max-top-n-tokens.
MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5
# --max-choices: OpenAI's `n` (times the prompts of a completions body) is that many sequences in the batch.
MAX_CHOICES = 16
# top_k travels as a uint32 on the shard wire.
MAX_TOP_K = 2**32 - 1
# OpenAI's documented range for frequency and presence penalties.
MAX_ABS_PENALTY = 2.0
# --max-best-of: TGI's default.
MAX_BEST_OF = 2
# The shards take the sampling numbers as 32-bit floats: a larger magnitude would arrive as inf (and the shards
# would refuse the whole step), a smaller nonzero one as 0 or a denormal (0 means "off" to them).
FLOAT32_MAX = 3.4028234663852886e38
# Request priorities are within +-this (a 32-bit integer's range).
MAX_PRIORITY = 2**31 - 1
FLOAT32_TINY = 1.1754943508222875e-38


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-request bounds that flags set; every API's parser checks them under its own field names."""

    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_top_n_tokens: int = MAX_TOP_N_TOKENS
    max_choices: int = MAX_CHOICES
    max_best_of: int = MAX_BEST_OF

    def __post_init__(self) -> None:
        bounds = (("max_stop_sequences", 0), ("max_top_n_tokens", 0), ("max_choices", 1), ("max_best_of", 1))
        for name, least in bounds:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    def check(self, params: "GenerationParams") -> None:
        """Apply the stop-sequence and alternatives-per-token bounds to params built directly (the gRPC front)."""
        as_stop("stop", params.stop, max_count=self.max_stop_sequences)
        as_int("top_n_tokens", params.top_n_tokens, le=self.max_top_n_tokens)


DEFAULT_LIMITS = RequestLimits()


@dataclass(slots=True)
class GenerationParams:
    """How one request generates: token limit, sampling, penalties, stop sequences, streaming."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = True
    ignore_eos: bool = False
    top_n_tokens: int = 0
    # The output's constraint (router/structured.py), compiled before submission.
    grammar: GrammarSpec | None = None
    # Typical sampling's mass (TGI's typical_p); 1.0 is off.
    typical_p: float = 1.0
    # Token id -> bias added to its logit before every sample (OpenAI's logit_bias).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Score the prompt (TGI's decoder_input_details, OpenAI's echo with logprobs); such a request is never
    # admitted from the prefix cache, so every prompt token is computed and scored.
    prompt_logprobs: bool = False
    # vLLM's: token ids that end the request as a stop string does (their text kept unless special), the
    # matched stop string kept in the output, and special tokens' text left in.
    stop_token_ids: list[int] = field(default_factory=list)
    # Min-p (vLLM's, llama.cpp's): a drawn token is at least this share as likely as the most likely one.
    min_p: float = 0.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's allowed_token_ids (only these are sampled; empty: every token) and bad_words (never generated),
    # the words' token ids filled in at validation (router/bad_words.py).
    allowed_token_ids: list[int] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    bad_word_ids: list[list[int]] = field(default_factory=list)
    # vLLM's cache_salt: the request's prompt blocks are shared through the prefix cache only with requests
    # of the same salt.
    cache_salt: str | None = None
    # OpenAI's Predicted Outputs: the output expected, the request's proposals' source; its token ids filled in
    # at validation (router/prediction.py).
    prediction: str | None = None
    prediction_ids: list[int] = field(default_factory=list)
    # vLLM's priority: lower is scheduled earlier (router/waiting_queue.py); anything but 0 needs the router's
    # --scheduling-policy priority.
    priority: int = 0

    def __post_init__(self) -> None:
        self.max_new_tokens = as_int("max_new_tokens", self.max_new_tokens, ge=1)
        self.temperature = as_float("temperature", self.temperature, ge=0)
        self.top_p = as_float("top_p", self.top_p, gt=0, le=1)
        self.top_k = as_int("top_k", self.top_k, ge=0, le=MAX_TOP_K)
        self.repetition_penalty = as_float("repetition_penalty", self.repetition_penalty, gt=0)
        self.frequency_penalty = as_float(
            "frequency_penalty", self.frequency_penalty, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY
        )
        self.presence_penalty = as_float(
            "presence_penalty", self.presence_penalty, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY
        )
        self.stop = as_stop("stop", self.stop)
        self.seed = as_seed("seed", self.seed)
        self.stream = as_bool("stream", self.stream)
        self.ignore_eos = as_bool("ignore_eos", self.ignore_eos)
        self.top_n_tokens = as_int("top_n_tokens", self.top_n_tokens, ge=0)
        self.typical_p = as_float("typical_p", self.typical_p, gt=0, le=1)
        self.logit_bias = as_logit_bias("logit_bias", {str(k): v for k, v in self.logit_bias.items()})
        self.prompt_logprobs = as_bool("prompt_logprobs", self.prompt_logprobs)
        self.stop_token_ids = as_token_ids("stop_token_ids", self.stop_token_ids) if self.stop_token_ids else []
        self.min_p = as_float("min_p", self.min_p, ge=0, le=1)
        self.include_stop_str_in_output = as_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self.skip_special_tokens = as_bool("skip_special_tokens", self.skip_special_tokens)
        if self.allowed_token_ids:
            self.allowed_token_ids = as_token_ids("allowed_token_ids", self.allowed_token_ids)
        self.bad_words = as_bad_words("bad_words", self.bad_words)
        if self.cache_salt is not None:
            self.cache_salt = as_prompt("cache_salt", self.cache_salt)
        self.priority = as_int("priority", self.priority, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
        if self.prediction is not None and not isinstance(self.prediction, str):
            raise BadRequest(f"prediction must be a string, got {json_type_name(self.prediction)}")
        if self.grammar is not None and self.ignore_eos:
            raise ValidationError(
                f"{self.grammar.field} cannot be combined with ignore_eos or min_tokens: a finished "
                "grammar allows only the end-of-sequence token"
            )
        for name in (
            "temperature",
            "top_p",
            "typical_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            value = getattr(self, name)
            if value and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
                raise ValidationError(
                    f"{name} must be of a magnitude between {FLOAT32_TINY:.7g} and {FLOAT32_MAX:.7g} "
                    f"(the shards take 32-bit floats), got {value}"
                )


@dataclass(slots=True)
class GenerationRequest:
    """A validated request: exactly one of a raw `prompt`, chat `messages` or the prompt's token ids
    (`prompt_token_ids`, used as given: no special tokens added), and how to generate."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    params: GenerationParams
    # Tools for a chat template that takes them (router/tools.py), OpenAI's `{"type": "function", ...}` form.
    tools: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    # Chat: apply_chat_template's options (add_generation_prompt, continue_final_message, vLLM's
    # chat_template_kwargs); empty: a new assistant turn is opened.
    template_options: dict[str, Any] = field(default_factory=dict)
    # A raw prompt gets the tokenizer's special tokens (BOS) unless false (vLLM's completions field).
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.prompt_token_ids is not None and (self.prompt is not None or self.messages is not None):
            raise ValidationError("give prompt token ids alone, without a prompt string or messages")
        if self.prompt_token_ids is None and (self.prompt is None) == (self.messages is None):
            raise ValidationError("give exactly one of prompt or messages")

    @property
    def answers_chat(self) -> bool:
        """A chat request whose output is a new message, not its final one continued."""
        return self.messages is not None and not self.template_options.get("continue_final_message")


def render_prompt(tokenizer: "PreTrainedTokenizerBase", request: GenerationRequest) -> str:
    """The prompt text: `request.prompt`, or its messages rendered with the tokenizer's chat template.

    A template that rejects the conversation (`raise_exception` in the template, or any other
    jinja error) is the caller's mistake, so it becomes a ValidationError carrying the reason.
    """
    if request.prompt is not None:
        return request.prompt
    if tokenizer.chat_template is None:
        raise ValidationError("this model has no chat template; send a prompt instead of messages")
    try:
        options = {"add_generation_prompt": True, **request.template_options}
        return tokenizer.apply_chat_template(request.messages, tools=request.tools, tokenize=False, **options)
    except (jinja2.TemplateError, ValueError) as exc:
        # ValueError: transformers' own refusals (continue_final_message whose message the template drops).
        raise ValidationError(f"chat template rejected the messages: {exc}") from None
