"""vLLM's bad_words as token id sequences for the shards (shards/logits_processors.banned_tokens).

A word is tokenized as written (leading white space dropped), and again after one space, which most
tokenizers spell differently mid-text ("▁word", "Ġword"); that second spelling is kept where it starts
with another token and has as many tokens, as vLLM does, so that a word is banned at the start of the
output and after a space alike without banning a lone space token.
"""

from typing import TYPE_CHECKING

from mixserve.router.errors import ValidationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def bad_word_ids(tokenizer: "PreTrainedTokenizerBase", words: list[str]) -> list[list[int]]:
    """Each word's token ids, then its spelling after a space where that differs as above; ValidationError for
    a word the tokenizer reads as no token at all (its normalizer drops every character), which nothing
    could ban."""
    out: list[list[int]] = []
    for i, word in enumerate(words):
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not bare:
            raise ValidationError(f"bad_words[{i}] is no token of this model's tokenizer")
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return out
