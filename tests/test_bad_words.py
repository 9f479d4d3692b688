"""router/bad_words.py: vLLM's bad_words as token ids, on real tokenizers of both kinds: a byte-level BPE
(GPT-2's kind: a word after a space is another token) and the demo's Llama-style one (a space is part of the
word's first piece either way)."""

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mixserve.router.bad_words import bad_word_ids
from mixserve.router.errors import ValidationError

CORPUS = ["the hill and the mill", "hill mill hill", "a mill on the hill"] * 20


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_a_word_is_banned_as_written_and_after_a_space_where_that_is_another_token():
    tokenizer = byte_level_tokenizer()
    bare, spaced = tokenizer.encode("hill"), tokenizer.encode(" hill")
    assert len(bare) == len(spaced) == 1 and bare != spaced
    assert bad_word_ids(tokenizer, ["  hill"]) == [bare, spaced]  # leading white space dropped first
    # " the hill" is two tokens either way, and its spaced spelling starts with another token: both kept.
    assert bad_word_ids(tokenizer, ["the hill"]) == [tokenizer.encode("the hill"), tokenizer.encode(" the hill")]


def test_a_spelling_after_a_space_of_another_length_is_not_added():
    tokenizer = byte_level_tokenizer()
    # Never seen: "xq" is two byte tokens, " xq" three with a lone space first, which must not be banned.
    assert len(tokenizer.encode(" xq")) == 3
    assert bad_word_ids(tokenizer, ["xq"]) == [tokenizer.encode("xq")]


def test_a_word_the_tokenizer_reads_as_nothing_is_refused():
    tokenizer = byte_level_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("q", "")  # a normalizer that drops "q"
    assert tokenizer.encode("qq") == []
    with pytest.raises(ValidationError, match=r"bad_words\[1\] is no token"):
        bad_word_ids(tokenizer, ["hill", "qq"])


def test_a_llama_style_word_is_banned_at_a_line_start_and_after_a_space(demo_dir):
    # Alone, the demo's Llama-style tokenizer spells a word as after a space ("▁h", "ill"); an output writes it
    # so after a space, and "h", "ill" at a line's start. Both are banned, whatever their lengths ("▁ABC" is one
    # token, "AB", "C" two).
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    spellings = [tokenizer.convert_ids_to_tokens(ids) for ids in bad_word_ids(tokenizer, ["hill", " ABC"])]
    assert spellings == [["h", "ill"], ["▁h", "ill"], ["AB", "C"], ["▁ABC"]]
