"""Incremental detokenizer: streamed deltas against a full decode, on real byte-fallback and byte-level BPE."""

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from mixserve.router.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog!",
    "café naïve über 中文 字 日本語 ☃ 🚀 🙂",
    "  double  spaces and\nnewlines\tand tabs",
    "def add(x, y):\n    return x + y  # code",
] * 10
# Characters outside CORPUS reach the byte-fallback tokenizer as <0xXX> tokens.
TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("abcdefghij lo wrd.,!\n\t"),
        st.sampled_from("é中字丁語ßΩж🚀🦀😀👍🏽\u200d"),
        st.characters(codec="utf-8", exclude_characters="\ufffd"),
    ),
    max_size=40,
)


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Mistral-style tokenizer: BPE with <0xXX> byte fallback, "▁" metaspace, BOS prepended."""
    metaspace = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_side = Tokenizer(BPE(unk_token="<unk>"))
    trainer_side.normalizer = metaspace
    trainer_side.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trainer_side.train_from_iterator(CORPUS, trainer)
    trained = json.loads(trainer_side.to_str())["model"]
    # Llama's layout: specials, then the 256 byte tokens, then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in trained["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) for merge in trained["merges"]]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE, whose merged tokens routinely split a character's bytes."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


LLAMA = llama_style_tokenizer()
BYTE_LEVEL = byte_level_tokenizer()
BYTE_ID = {b: LLAMA.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}


@pytest.fixture(scope="module", params=["llama", "byte_level", "demo"])
def tokenizer(request):
    if request.param == "demo":
        return request.getfixturevalue("demo_tokenizer")
    return {"llama": LLAMA, "byte_level": BYTE_LEVEL}[request.param]


@pytest.fixture(scope="module", params=["llama", "demo"])
def byte_fallback_tokenizer(request):
    return LLAMA if request.param == "llama" else request.getfixturevalue("demo_tokenizer")


def stream(tokenizer, prompt_ids, generated_ids, skip_special_tokens=True) -> list[str]:
    """Every delta the detokenizer emits for `generated_ids`, flush last."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(token_id) for token_id in generated_ids]
    deltas.append(detok.flush())
    assert detok.flush() == ""
    return deltas


def appended_text(tokenizer, prompt_ids, generated_ids) -> str:
    """What the generated ids add to the prompt's text in a full decode.

    That is the full decode after D(prompt), or when the prompt ends inside a character that the
    generated ids complete, after the decode of the prompt's whole characters.
    """
    full_text = tokenizer.decode(prompt_ids + generated_ids, skip_special_tokens=True)
    for end in range(len(prompt_ids), -1, -1):
        prompt_text = tokenizer.decode(prompt_ids[:end], skip_special_tokens=True)
        if full_text.startswith(prompt_text):
            return full_text[len(prompt_text) :]
    raise AssertionError("the empty prompt's text is a prefix of every text")


@functools.cache
def whole_character_ids(tokenizer) -> st.SearchStrategy[list[int]]:
    """Ids made of whole characters: learned pieces, any character as byte-fallback tokens, specials."""
    byte_ids = {b: tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    pieces = sorted(set(tokenizer.get_vocab().values()) - set(byte_ids.values()) - set(tokenizer.all_special_ids))
    unit = st.one_of(
        st.sampled_from(pieces).map(lambda token_id: [token_id]),
        st.characters(codec="utf-8").map(lambda char: [byte_ids[b] for b in char.encode()]),
        st.sampled_from(tokenizer.all_special_ids).map(lambda token_id: [token_id]),
    )
    return st.lists(unit, max_size=12).map(lambda units: [i for ids in units for i in ids])


@settings(max_examples=100, deadline=None)
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_byte_fallback_stream_is_the_full_decode_after_the_prompt(byte_fallback_tokenizer, data, skip_special_tokens):
    ids = whole_character_ids(byte_fallback_tokenizer)
    prompt, generated = data.draw(ids, label="prompt"), data.draw(ids, label="generated")
    prompt_text = byte_fallback_tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)
    full_text = byte_fallback_tokenizer.decode(prompt + generated, skip_special_tokens=skip_special_tokens)
    assert full_text.startswith(prompt_text)
    deltas = stream(byte_fallback_tokenizer, prompt, generated, skip_special_tokens)
    assert "".join(deltas) == full_text[len(prompt_text) :]


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.lists(st.integers(0, len(BYTE_LEVEL) - 1), max_size=12),
    generated=st.lists(st.integers(0, len(BYTE_LEVEL) - 1), max_size=12),
)
def test_byte_level_stream_is_the_full_decode_after_the_prompt(prompt, generated):
    # Arbitrary ids, so arbitrary byte strings: byte-level decoding replaces invalid bytes locally.
    prompt_text = BYTE_LEVEL.decode(prompt, skip_special_tokens=True)
    full_text = BYTE_LEVEL.decode(prompt + generated, skip_special_tokens=True)
    deltas = stream(BYTE_LEVEL, prompt, generated)
    if full_text.startswith(prompt_text):
        assert "".join(deltas) == full_text[len(prompt_text) :]
    assert all(not delta.endswith("\ufffd") for delta in deltas[:-1])


@settings(max_examples=150, deadline=None)
@given(text=TEXT, split=st.floats(0, 1))
def test_valid_text_never_streams_a_replacement_character(tokenizer, text, split):
    ids = tokenizer.encode(text)
    cut = round(split * len(ids))
    prompt, generated = ids[:cut], ids[cut:]
    deltas = stream(tokenizer, prompt, generated)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == appended_text(tokenizer, prompt, generated)


def test_first_generated_word_keeps_its_leading_space():
    prompt = LLAMA.encode("Hello")
    generated = LLAMA.encode("Hello world again")[len(prompt) :]
    deltas = stream(LLAMA, prompt, generated)
    assert "".join(deltas) == " world again"
    assert next(delta for delta in deltas if delta).startswith(" ")


def test_without_a_prompt_the_first_space_is_stripped_like_a_full_decode():
    generated = LLAMA.encode("Hello world", add_special_tokens=False)
    assert "".join(stream(LLAMA, [], generated)) == LLAMA.decode(generated) == "Hello world"


def test_multibyte_character_is_released_whole():
    crab = [BYTE_ID[b] for b in "🦀".encode()]
    assert len(crab) == 4
    deltas = stream(LLAMA, LLAMA.encode("a"), [*crab, *LLAMA.encode("ok", add_special_tokens=False)])
    assert deltas[:4] == ["", "", "", "🦀"]
    assert "".join(deltas) == "🦀 ok"


def test_flush_releases_an_incomplete_character_as_the_full_decode_does():
    detok = IncrementalDetokenizer(LLAMA, LLAMA.encode("a"))
    assert detok.add(BYTE_ID[0xE4]) == ""
    assert detok.add(BYTE_ID[0xB8]) == ""
    assert detok.flush() == LLAMA.decode([BYTE_ID[0xE4], BYTE_ID[0xB8]]) == "\ufffd\ufffd"
    assert detok.flush() == ""


def test_skipped_special_token_keeps_the_next_words_space():
    prompt = LLAMA.encode("Hello")
    world = LLAMA.encode("world", add_special_tokens=False)
    deltas = stream(LLAMA, prompt, [LLAMA.eos_token_id, *world])
    assert "".join(deltas) == " world"
    deltas = stream(LLAMA, prompt, [LLAMA.eos_token_id, *world], skip_special_tokens=False)
    assert "".join(deltas) == "</s> world"


def test_prompt_ending_in_many_special_tokens_keeps_the_first_space():
    # The last PREFIX_WINDOW prompt tokens decode to nothing; the window reaches back to "Hello".
    prompt = [*LLAMA.encode("Hello"), *[LLAMA.eos_token_id] * 6]
    generated = LLAMA.encode("world", add_special_tokens=False)
    assert "".join(stream(LLAMA, prompt, generated)) == " world"


def test_prompt_of_only_special_tokens_decodes_like_a_full_decode():
    generated = LLAMA.encode("Hi there", add_special_tokens=False)
    assert "".join(stream(LLAMA, [LLAMA.bos_token_id], generated)) == "Hi there"


def test_prompt_ending_inside_a_character_streams_the_completed_character():
    # "丁" is E4 B8 81; the prompt holds its first two bytes, after a whole "🦀" in the same byte run,
    # so the prompt's run decodes to U+FFFDs only, 🦀 included.
    prompt = [*LLAMA.encode("x"), *[BYTE_ID[b] for b in "🦀".encode()], BYTE_ID[0xE4], BYTE_ID[0xB8]]
    generated = [BYTE_ID[0x81], *LLAMA.encode("y", add_special_tokens=False)]
    assert LLAMA.decode(prompt, skip_special_tokens=True) == "x" + "\ufffd" * 6
    assert stream(LLAMA, prompt, generated) == ["丁", " y", ""]


def test_window_seeded_inside_a_character_still_decodes_later_bytes():
    # Five tokens back from the prompt's end falls inside the first "丁"; the generated "丁" joins
    # the same run of byte tokens, which byte fallback only decodes when the run starts cleanly.
    ding = [BYTE_ID[b] for b in "丁".encode()]
    deltas = stream(LLAMA, [LLAMA.bos_token_id, *ding, *ding], ding)
    assert deltas == ["", "", "丁", ""]


def test_genuine_replacement_character_in_the_prompt_is_not_sent_again():
    # The window seeded 5 tokens back starts inside "ࠀ" (E0 A0 80), after a genuine U+FFFD (EF BF BD).
    prompt = [BYTE_ID[b] for b in "x\ufffdࠀ".encode()]
    generated = [BYTE_ID[b] for b in "ࠀ0".encode()]
    assert "".join(stream(LLAMA, prompt, generated)) == "ࠀ0"


def test_space_byte_after_a_four_byte_character():
    # Alone, the window holding the space byte decodes to "" (the decoder strips one leading space).
    generated = [BYTE_ID[b] for b in "𐀀 0".encode()]
    assert stream(LLAMA, [], generated) == ["", "", "", "𐀀", " ", "0", ""]


def test_accepts_a_bare_tokenizers_tokenizer():
    prompt = LLAMA.encode("Hello")
    generated = LLAMA.encode("Hello world")[len(prompt) :]
    assert "".join(stream(LLAMA.backend_tokenizer, prompt, generated)) == " world"
