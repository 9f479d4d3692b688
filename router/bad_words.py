"""vLLM's bad_words as token id sequences for the shards (shards/logits_processors.banned_tokens).

A word is tokenized as an output writes it with nothing before it (router/continuation.py: as after a line
break; leading white space dropped), and again after one space, which most tokenizers spell differently
("▁word", "Ġword"); that second spelling is kept where it starts with another token and not with a lone
space token (a word the vocabulary lacks, spelled " " then its pieces), so that a word is banned at a
line's start and after a space alike without banning a lone space token. vLLM tokenizes the word alone,
which Llama-style tokenizers already spell with the space: a word at a line's start went unbanned there.
"""

from typing import TYPE_CHECKING

from mixserve.router.continuation import continuation_ids
from mixserve.router.errors import ValidationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def bad_word_ids(tokenizer: "PreTrainedTokenizerBase", words: list[str]) -> list[list[int]]:
    """Each word's token ids, then its spelling after a space where that differs as above; ValidationError for
    a word the tokenizer reads as no token at all (its normalizer drops every character), which nothing
    could ban."""
    out: list[list[int]] = []
    if not words:
        return out
    space = continuation_ids(tokenizer, " ")
    for i, word in enumerate(words):
        bare = continuation_ids(tokenizer, word.lstrip())
        if not bare:
            raise ValidationError(f"bad_words[{i}] is no token of this model's tokenizer")
        spaced = continuation_ids(tokenizer, " " + word.lstrip())
        out.append(bare)
        if spaced and spaced[0] != bare[0] and spaced[: len(space)] != space:
            out.append(spaced)
    return out
