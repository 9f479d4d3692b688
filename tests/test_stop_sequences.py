"""Stop sequences over streamed deltas: cut at the first stop string whatever the delta boundaries."""

from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mixserve.router.stop_sequences import StopSequenceMatcher


def reference_cut(text: str, stops: list[str], keep_stop: bool = False) -> tuple[str, bool]:
    """The shortest prefix of `text` that contains a stop string, minus that stop string (the longest
    one ending there) unless `keep_stop`; or all of `text` when none occurs."""
    for end in range(1, len(text) + 1):
        ending_here = [stop for stop in stops if text[:end].endswith(stop)]
        if ending_here:
            return text[: end - (0 if keep_stop else len(max(ending_here, key=len)))], True
    return text, False


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    return max((n for n in range(1, len(text) + 1) for stop in stops if stop[:n] == text[-n:] != stop), default=0)


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(cut % (len(text) + 1) for cut in cuts)), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


# A small alphabet makes stop strings, partial matches and self-overlaps common.
small_text = st.text(alphabet="ab c\u00e9\U0001f680", max_size=30)
stop_lists = st.lists(st.text(alphabet="ab c\u00e9\U0001f680", min_size=1, max_size=5), max_size=4)


@settings(max_examples=300, deadline=None)
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 100), max_size=12))
@example(text="abcd", stops=["abcd", "bc"], cuts=[])
@example(text="aaab", stops=["aab"], cuts=[1, 2])
@example(text="xab", stops=["ab", "b"], cuts=[2])
@example(text="bbabaabbbabbbabbbbbaaaaba", stops=["bbabbbb"], cuts=[])
@pytest.mark.parametrize("keep_stop", [False, True], ids=["cut-before", "kept"])
def test_stream_is_cut_at_the_first_stop_string(text, stops, cuts, keep_stop):
    expected, expect_stop = reference_cut(text, stops, keep_stop)
    matcher = StopSequenceMatcher(stops, keep_stop)
    emitted, fed, stopped = "", "", False
    for delta in split_at(text, cuts):
        out, stopped = matcher.feed(delta)
        emitted += out
        fed += delta
        # Nothing past the cut is ever sent, and only what might still start a stop string waits.
        assert expected.startswith(emitted)
        if not stopped:
            assert emitted == fed[: len(fed) - held_back(fed, stops)]
    if not stopped:
        emitted += matcher.flush()
    assert (emitted, stopped) == (expected, expect_stop)
    assert matcher.stopped == expect_stop
    if expect_stop:
        assert matcher.matched_stop in stops
        if keep_stop:
            assert expected.endswith(matcher.matched_stop)
        else:
            assert text[len(expected) :].startswith(matcher.matched_stop)


def test_stop_string_split_across_deltas_is_never_sent():
    matcher = StopSequenceMatcher(["</answer>"])
    assert matcher.feed("The result is 4<") == ("The result is 4", False)
    assert matcher.feed("/ans") == ("", False)
    assert matcher.feed("wer> and more") == ("", True)
    assert matcher.matched_stop == "</answer>"
    assert matcher.feed("ignored") == ("", True)
    assert matcher.flush() == ""


def test_partial_match_that_breaks_off_is_released():
    matcher = StopSequenceMatcher(["\n\nUser:"])
    assert matcher.feed("Hi\n") == ("Hi", False)
    assert matcher.feed("\nUs") == ("", False)
    assert matcher.feed("ually") == ("\n\nUsually", False)


def test_flush_releases_the_held_back_text_at_the_end():
    matcher = StopSequenceMatcher(["###"])
    assert matcher.feed("done ##") == ("done ", False)
    assert matcher.flush() == "##"
    assert matcher.flush() == ""


def test_without_stop_strings_deltas_pass_straight_through():
    matcher = StopSequenceMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_stop_string_at_the_very_start():
    matcher = StopSequenceMatcher(["Q:", "\n"])
    assert matcher.feed("Q: next") == ("", True)
    assert matcher.matched_stop == "Q:"


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopSequenceMatcher(["ok", ""])
