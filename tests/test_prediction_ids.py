"""router/prediction.py's tokenization of a prediction (router/continuation.py): the tokens an output that
goes on from its prompt spells (the inverse of the text the server writes for it), on the demo's
Llama-style tokenizer (a text alone starts with a space piece) and on a byte-level BPE one (line breaks
merge)."""

import random

from test_bad_words import byte_level_tokenizer

from mixserve.router.params import GenerationParams, GenerationRequest
from mixserve.router.prediction import prediction_ids

CORPUS_TEXT = "The hill, and the mill.\nThe cat sat on the mat... a mill on the hill; the end.\n" * 8


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def output_cuts(tokenizer, count: int) -> list[tuple[str, list[int]]]:
    """(text the server writes for the output, the output's ids): a prompt's tokens then the output's,
    cut from the tokenized corpus at random places."""
    ids = tokenizer.encode(CORPUS_TEXT, add_special_tokens=False)
    rng, cuts = random.Random(0), []
    for _ in range(count):
        start = rng.randrange(0, len(ids) // 2)
        cut = rng.randrange(start + 3, start + 20)
        prompt, output = ids[start:cut], ids[cut : cut + 16]
        cuts.append((decode(tokenizer, prompt + output)[len(decode(tokenizer, prompt)) :], output))
    return cuts


def test_a_completion_prediction_is_tokenized_as_the_output_spells_it(demo_tokenizer):
    for tokenizer in (demo_tokenizer, byte_level_tokenizer()):
        cuts = output_cuts(tokenizer, 60)
        for text, output in cuts:
            assert prediction_ids(tokenizer, text, 1000) == output, (text, output)
    # Tokenized alone, the Llama-style tokenizer spells an output that starts without a space otherwise.
    alone = [demo_tokenizer.encode(text, add_special_tokens=False) for text, _ in output_cuts(demo_tokenizer, 60)]
    assert alone != [output for _, output in output_cuts(demo_tokenizer, 60)]


def test_a_chat_answer_is_tokenized_as_a_text_of_its_own(demo_tokenizer):
    # The demo's chat answers, as Mistral's, start with a space piece whether the prediction has the space or not.
    spaced = demo_tokenizer.encode(" Sure, the mill.", add_special_tokens=False)
    for text in ("Sure, the mill.", " Sure, the mill."):
        assert prediction_ids(demo_tokenizer, text, 1000, answer=True) == spaced
    assert prediction_ids(demo_tokenizer, "Sure, the mill.", 1000) != spaced  # as a completion's: no space


def test_which_requests_answer_a_chat():
    messages = [{"role": "user", "content": "hi"}]
    assert GenerationRequest(prompt=None, messages=messages, params=GenerationParams()).answers_chat
    continued = {"continue_final_message": True, "add_generation_prompt": False}
    assert not GenerationRequest(None, messages, GenerationParams(), template_options=continued).answers_chat
    assert not GenerationRequest(prompt="hi", messages=None, params=GenerationParams()).answers_chat
