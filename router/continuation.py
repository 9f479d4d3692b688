"""A text's token ids as an output spells them: the inverse of the text the server writes for an output
(router/detokenizer.py), for the fields that say what an output may write (a predicted output, bad words).

Tokenizers that start a text with a space piece (SentencePiece's metaspace: Llama's, Mistral's) tokenize
".\\nThe" alone as "▁", ".", "<0x0A>", ..., where an output that goes on from its prompt writes ".",
"<0x0A>", "The" (the real Mixtral tokenizer spelled 135 of 300 cuts of corpus text otherwise alone), and
"hill" alone as "▁hill", the word after a space, where an output writes "hill" after a line break. So the
text is tokenized after a line break (MARKER), whose tokens are then dropped; where they are not the joined
text's first tokens (the break merged with what follows, as byte-level BPE merges line breaks), the text
alone (such tokenizers add no space to a text alone).
"""

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A text after which a tokenizer starts a new piece without a space of its own.
MARKER = "\n"


@functools.cache
def _marker_ids(tokenizer: "PreTrainedTokenizerBase") -> tuple[int, ...]:
    """MARKER's token ids (the engine's one tokenizer lives as long as the process)."""
    return tuple(tokenizer.encode(MARKER, add_special_tokens=False))


def continuation_ids(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """`text`'s token ids as an output that goes on from its prompt spells them (no special tokens)."""
    marker = list(_marker_ids(tokenizer))
    joined = tokenizer.encode(MARKER + text, add_special_tokens=False)
    if joined[: len(marker)] == marker:
        return joined[len(marker) :]
    return tokenizer.encode(text, add_special_tokens=False)
