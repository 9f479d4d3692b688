"""The predicted-output proposer (shards/prediction.py): where the output has reached in the prediction."""

from mixserve.shards.prediction import PredictionIndex

PROMPT = [900, 901, 902]


def run(index: PredictionIndex, output: list[int], k: int) -> list[int]:
    return index.propose(PROMPT + output, len(output), k)


def test_proposes_the_prediction_from_its_start_and_follows_the_output():
    prediction = [10, 11, 12, 13, 14, 15]
    index = PredictionIndex(prediction)
    assert run(index, [], 3) == [10, 11, 12]
    assert run(index, [10, 11], 3) == [12, 13, 14]
    assert run(index, [10, 11, 12, 13, 14, 15], 3) == []  # the prediction is used up


def test_the_output_reaches_the_same_place_on_later_calls_whatever_came_between():
    # The output's tokens arrive a few at a time, some of them with no call between (a paused step).
    prediction = list(range(20, 40))
    index = PredictionIndex(prediction)
    output: list[int] = []
    for chunk in ([20], [21, 22, 23], [24], [25, 26, 27, 28, 29]):
        output += chunk
        assert run(index, output, 4) == prediction[len(output) : len(output) + 4]
    assert index.starts is None  # never searched: no n-gram table made for a prediction followed throughout


def test_after_an_edit_the_output_finds_its_place_again_at_or_after_where_it_left():
    # Code repeats short runs: `a = x`, then an edit, then `x` again must map to the later occurrence.
    a, eq, x, y, nl = 1, 2, 3, 4, 5
    prediction = [a, eq, x, nl, y, eq, x, nl, a, eq, y, nl]
    index = PredictionIndex(prediction)
    assert run(index, [a, eq, x, nl], 2) == [y, eq]
    output = [a, eq, x, nl, 77]  # an edit: a token the prediction never has
    assert run(index, output, 2) == []
    output += [eq, x]  # back into the prediction: `= x` at 1 (behind) and 5: the one after where it left (4)
    assert run(index, output, 2) == [nl, a]
    output += [nl, a, eq, y, nl]
    assert run(index, output, 2) == []


def test_two_tokens_find_a_place_ahead_three_also_behind():
    prediction = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    index = PredictionIndex(prediction)
    assert run(index, [1, 2, 3], 2) == [4, 5]
    # Off the prediction, one token of it is no place (too common to tell): nothing proposed ...
    assert run(index, [1, 2, 3, 99, 7], 2) == []
    # ... two in a row ahead of where the output left are.
    assert run(index, [1, 2, 3, 99, 7, 8], 2) == [9, 10]
    # Behind the furthest place reached, two tokens are not ...
    output = [1, 2, 3, 99, 7, 8, 98, 2, 3]
    assert run(index, output, 2) == []
    # ... three are.
    assert run(index, [*output, 4], 2) == [5, 6]


def test_the_longest_suffix_wins():
    # [8, 9] occurs at 0 and 5; the output's last three tokens [7, 8, 9] only at 4.
    prediction = [8, 9, 50, 51, 7, 8, 9, 60, 61]
    index = PredictionIndex(prediction)
    assert run(index, [70, 7, 8, 9], 2) == [60, 61]


def test_output_present_before_the_first_call_is_followed():
    # The first proposing step comes after the prefill sampled a token or more.
    index = PredictionIndex([5, 6, 7, 8])
    assert run(index, [5, 6], 5) == [7, 8]
    assert PredictionIndex([5, 6, 7, 8]).propose(PROMPT + [9], 1, 2) == []


def test_a_place_just_found_proposes_as_many_tokens_as_found_it_until_followed():
    prediction = list(range(10, 40))
    index = PredictionIndex(prediction)
    assert run(index, [10, 11], 8) == prediction[2:10]
    output = [10, 11, 99, 20, 21]  # found again on two tokens: two proposals, not eight
    assert run(index, output, 8) == [22, 23]
    output += [22, 23, 24]  # kept, and the next token too: the output follows the prediction again
    assert run(index, output, 8) == prediction[15:23]
    output = [*output, 98, 28, 29, 30, 31]  # four tokens found it: four proposals
    assert run(index, output, 8) == [32, 33, 34, 35]


def test_a_sequence_computed_again_finds_its_place_from_the_output_in_its_prompt():
    # Preempted and recomputed, a sequence's output so far is prompt on the shard; one new token sampled.
    prediction = list(range(50, 70))
    index = PredictionIndex(prediction)
    assert index.propose([*PROMPT, *prediction[:5], prediction[5]], 1, 8) == prediction[6:10]
