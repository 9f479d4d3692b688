"""OpenAI's Predicted Outputs on the router: the `prediction` field read, tokenized, and reported.

A client that knows most of the answer (a file it asks to have edited, a text to rewrite with small
changes) sends it as `prediction: {"type": "content", "content": ...}`, the content a string or an
array of text parts (joined by newlines, as chat messages' are). The request's proposals then come
from the prediction, where its output has reached in it (shards/prediction.py), and it speculates
even where the engine runs without `--speculate` (router/speculation.py), so the runs of the output
that repeat the prediction come several tokens a step. The output is the model's whatever the
prediction says, so OpenAI's limits on such requests (no n > 1, logprobs, tools or penalties) do
not apply here. The prediction is tokenized as the output would spell it: going on from the prompt
(completions, gRPC, a continued final message), or as a chat answer of its own. `usage` then says how
many proposed tokens the output kept (`accepted_prediction_tokens`) and how many it did not
(`rejected_prediction_tokens`).
"""

from typing import TYPE_CHECKING

from mixserve.router.continuation import continuation_ids
from mixserve.router.errors import BadRequest, ValidationError, json_type_name
from mixserve.router.fields import as_text_parts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from mixserve.router.engine_api import GenerationHandle


def parse_prediction(value: object) -> str | None:
    """The predicted text of an OpenAI `prediction` object (None where absent); a BadRequest or
    ValidationError for a malformed one."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"prediction must be an object, got {json_type_name(value)}")
    if value.get("type") != "content":
        raise ValidationError(f'prediction.type must be "content", got {value.get("type")!r}')
    return as_text_parts("prediction.content", value.get("content"))


def prediction_ids(
    tokenizer: "PreTrainedTokenizerBase", text: str | None, limit: int, answer: bool = False
) -> list[int]:
    """The prediction's token ids (no special tokens), at most `limit` of them (the longest output a
    request may have); [] for none. `answer`: the prediction is a chat answer of its own (tokenized as a
    text that starts there); else it goes on from the prompt (router/continuation.py)."""
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False) if answer else continuation_ids(tokenizer, text)
    if len(ids) > limit:
        raise ValidationError(f"prediction has {len(ids)} tokens, more than max_total_tokens {limit}")
    return ids


def completion_details(generations: "list[GenerationHandle]") -> dict[str, int]:
    """`usage.completion_tokens_details` of predicted requests: the proposed tokens kept and not kept, over
    every generation of a response."""
    proposed = sum(g.speculative_proposed for g in generations)
    accepted = sum(g.speculative_accepted for g in generations)
    return {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": proposed - accepted}
