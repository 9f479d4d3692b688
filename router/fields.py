"""Request-body field validators: each takes the field's name as the client spelled it and the raw
JSON value, so every API body (`/predict`, OpenAI, TGI, gRPC, each parsed in its front with its own
names and defaults) reports errors in its own vocabulary. A JSON null counts as an absent field. A value
of the wrong JSON type is a `BadRequest` (400); a well-typed value out of range, or fields that
contradict each other, a `ValidationError` (422). Both name the field, and the bound. The parameters
they build are router/params.py's.
"""

import json
import math
import re
from typing import Any, NoReturn

from mixserve.router.errors import BadRequest, RouterError, ValidationError, json_type_name

MAX_SEED = 2**64 - 1
# OpenAI's bounds on logit_bias: at most this many tokens, each biased within +-MAX_ABS_LOGIT_BIAS.
MAX_LOGIT_BIAS_TOKENS = 300
MAX_ABS_LOGIT_BIAS = 100.0
# At most this many bad_words (vLLM's), each checked against the output on every sample.
MAX_BAD_WORDS = 300


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


# Arrays and objects nested deeper than this are refused: the readers of a body's JSON (schemas, chat
# templates) recurse, and Python's stack is about a thousand frames.
MAX_JSON_DEPTH = 100
# A \uD800-\uDFFF escape in JSON text: half of a UTF-16 surrogate pair, or a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def json_value(text: bytes | str, what: str, error: type[RouterError]) -> Any:
    """Parse JSON text (a request body, or a field holding JSON as text), raising `error` naming `what`
    unless it is JSON: NaN and Infinity are not, arrays and objects nest at most MAX_JSON_DEPTH levels,
    and no string may hold a lone UTF-16 surrogate (such text has no UTF-8 spelling to tokenize or to
    answer with)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # nested past the parser's stack
        raise error(_too_deep(what)) from None
    except ValueError as exc:  # NaN or Infinity
        raise error(f"{what} is not valid JSON: {exc}") from None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _too_deep_value(value):  # could nest that deep
        raise error(_too_deep(what))
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise error(
                f"{what} is not valid JSON text: a string holds a lone UTF-16 surrogate "
                f"(\\u{ord(exc.object[exc.start]):04x}); send each surrogate with its pair, or the character itself"
            ) from None
    return value


def decode_json_body(raw: bytes | str) -> dict[str, Any]:
    """Parse a request body that must be one JSON object (`json_value`'s rules)."""
    body = json_value(raw, "request body", BadRequest)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {json_type_name(body)}")
    return body


def _too_deep(what: str) -> str:
    return f"{what} nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"


def _too_deep_value(value: object) -> bool:
    """Whether arrays and objects in `value` nest deeper than MAX_JSON_DEPTH, walked a level at a time."""
    level = [value] if isinstance(value, (dict, list)) else []  # the containers at depth 1, 2, ...
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


def _bound_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    parts = [f"{op} {bound}" for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if bound is not None]
    return " and ".join(parts)


def as_bool(name: str, value: object, *, default: bool | None = None) -> bool:
    """A JSON boolean; null or absent gives `default`."""
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be a boolean, got {json_type_name(value)}")
    return value


def as_int(
    name: str, value: object, *, default: int | None = None, ge: int | None = None, le: int | None = None
) -> int:
    """A JSON integer within [ge, le]; null or absent gives `default`. Booleans and 1.0 are not integers."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {json_type_name(value)}")
    if (ge is not None and value < ge) or (le is not None and value > le):
        raise ValidationError(f"{name} must be {_bound_text(ge, None, le, None)}, got {value}")
    return value


def as_float(
    name: str,
    value: object,
    *,
    default: float | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> float:
    """A finite JSON number within the given bounds; null or absent gives `default`."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, got {json_type_name(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(f"{name} must be a finite number, got {number}")
    if (
        (ge is not None and number < ge)
        or (gt is not None and number <= gt)
        or (le is not None and number > le)
        or (lt is not None and number >= lt)
    ):
        raise ValidationError(f"{name} must be {_bound_text(ge, gt, le, lt)}, got {value}")
    return number


def as_seed(name: str, value: object) -> int | None:
    """An unsigned 64-bit integer seed, or None (null or absent) for an unseeded request."""
    if value is None:
        return None
    return as_int(name, value, ge=0, le=MAX_SEED)


def as_stop(name: str, value: object, *, max_count: int | None = None) -> list[str]:
    """Stop sequences: one string or an array of non-empty strings, at most `max_count` of them when given."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise BadRequest(f"{name} must be a string or an array of strings, got {json_type_name(value)}")
    if max_count is not None and len(value) > max_count:
        raise ValidationError(f"{name} must hold at most {max_count} strings, got {len(value)}")
    for i, stop in enumerate(value):
        if not isinstance(stop, str):
            raise BadRequest(f"{name}[{i}] must be a string, got {json_type_name(stop)}")
        if not stop:
            raise ValidationError(f"{name}[{i}] must not be empty")
    return list(value)


def as_bad_words(name: str, value: object) -> list[str]:
    """vLLM's bad_words: an array of at most MAX_BAD_WORDS words, each with more than white space."""
    words = as_stop(name, value, max_count=MAX_BAD_WORDS)
    for i, word in enumerate(words):
        if not word.strip():
            raise ValidationError(f"{name}[{i}] must not be only white space")
    return words


def as_prompt(name: str, value: object) -> str:
    """A non-empty prompt string."""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {json_type_name(value)}")
    if not value:
        raise ValidationError(f"{name} must not be empty")
    return value


def as_text_parts(name: str, value: object, part_types: tuple[str, ...] = ("text",)) -> str:
    """A string, or an array of text parts (`{"type": one of part_types, "text": string}`) joined by newlines."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a string or an array of text parts, got {json_type_name(value)}")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") not in part_types or not isinstance(part.get("text"), str):
            raise ValidationError(f"{name}[{j}]: only text parts ({', '.join(part_types)}) are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def as_messages(name: str, value: object) -> list[dict[str, str]]:
    """A non-empty array of {role, content} string objects; other keys are dropped."""
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be an array of {{role, content}} objects, got {json_type_name(value)}")
    if not value:
        raise ValidationError(f"{name} must not be empty")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"{name}[{i}] must be an object, got {json_type_name(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise BadRequest(f"{name}[{i}].{key} must be a string, got {json_type_name(message.get(key))}")
        if not message["role"]:
            raise ValidationError(f"{name}[{i}].role must not be empty")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def as_token_ids(name: str, value: object) -> list[int]:
    """A non-empty array of token ids (non-negative integers; below the vocabulary size is checked with the
    tokenizer: router/validation.py)."""
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be an array of token ids, got {json_type_name(value)}")
    if not value:
        raise ValidationError(f"{name} must not be empty")
    for i, token_id in enumerate(value):
        # JSON true/false are not token ids, though Python counts bool as int.
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise BadRequest(f"{name}[{i}] must be a token id (an integer), got {json_type_name(token_id)}")
        if token_id < 0:
            raise ValidationError(f"{name}[{i}] must be a token id (>= 0), got {token_id}")
    return list(value)


def as_logit_bias(name: str, value: object) -> dict[int, float]:
    """OpenAI's logit_bias: an object of token id (a decimal string) -> bias in [-100, 100], at most 300 entries.
    That the ids are below the vocabulary size is checked with the tokenizer (router/validation.py)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object of token id -> bias, got {json_type_name(value)}")
    if len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise ValidationError(f"{name} must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(value)}")
    bias = {}
    for key, number in value.items():
        if not key.isascii() or not key.isdigit():
            raise ValidationError(f"{name} keys must be token ids (non-negative integers), got {key!r}")
        bias[int(key)] = as_float(f"{name}[{key!r}]", number, ge=-MAX_ABS_LOGIT_BIAS, le=MAX_ABS_LOGIT_BIAS)
    return bias


def max_new_tokens_from(body: dict[str, Any], names: tuple[str, ...], *, default: int) -> int:
    """The token limit under any of its accepted spellings; two spellings with different values are a 422."""
    given = {name: as_int(name, body[name], ge=1) for name in names if body.get(name) is not None}
    if len(set(given.values())) > 1:
        spelled = ", ".join(f"{name}={value}" for name, value in given.items())
        raise ValidationError(f"{' and '.join(given)} disagree ({spelled}); give one of them")
    return next(iter(given.values()), default)
